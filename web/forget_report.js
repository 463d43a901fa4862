/**
 * Forget Train's verdict on the node: after a run, one line says how far the concepts were
 * erased on the run's own held-out checks and what else moved ("erased 0.93 of the way to
 * 'a person'; other prompts moved 2% as far; ..."), and any warning says what to change.
 * The full figures are the node's report outputs. Load and Apply Forget Patch show the
 * verdicts a patch file carries.
 */
import { app } from "../../scripts/app.js";
import { element, hookNode, injectStyle } from "./fmn_dom.js";

// Forget Train shows its run's verdict; Load and Apply Forget Patch show the one the patch carries.
const NODE_NAMES = ["FMN_ForgetTrainSimple", "FMN_ForgetTrain", "FMN_LoadForgetPatch", "FMN_ApplyForgetPatch"];
const WIDGET_NAME = "fmn_verdict";
const STYLE_ID = "fmn-verdict-style";
const STYLE = `
.fmn-verdict { box-sizing: border-box; padding: 4px 6px; font: 12px sans-serif; line-height: 1.35;
  color: var(--input-text, #ddd); overflow-wrap: anywhere; }
.fmn-verdict-warning { color: #ff9a7a; margin-top: 2px; }
`;

/** Added with the node (the Vue renderer mounts DOM widgets when it first draws a node); empty until a run. */
function addVerdictWidget(node) {
  const holder = element("div", "fmn-verdict");
  const widget = node.addDOMWidget(WIDGET_NAME, "fmn_verdict", holder, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => (holder.childElementCount ? holder.scrollHeight : 0),
  });
  widget.serialize = false;
  return widget;
}

function showVerdict(node, report) {
  const widget = node.widgets.find((w) => w.name === WIDGET_NAME);
  widget.element.replaceChildren(
    element("div", "fmn-verdict-text", report.verdict),
    ...(report.warnings || []).map((warning) => element("div", "fmn-verdict-warning", `⚠ ${warning}`)),
  );
  const [width, height] = node.computeSize();
  node.setSize([Math.max(width, node.size[0]), Math.max(height, node.size[1])]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "forget_me_not.forget_report",
  setup: () => injectStyle(STYLE_ID, STYLE),
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_NAMES.includes(nodeData.name)) return;
    hookNode(nodeType, addVerdictWidget, (node, message) => {
      if (message?.fmn_report?.length) showVerdict(node, message.fmn_report[0]);
    });
  },
});
