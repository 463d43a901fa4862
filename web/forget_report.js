/**
 * Forget Train's verdict on the node: after a run, one line says how far the concepts were
 * erased on the run's own held-out checks and what else moved ("erased 0.93 of the way to
 * 'a person'; other prompts moved 2% as far; ..."), and any warning says what to change.
 * The full figures are the node's report outputs. Load and Apply Forget Patch show the
 * verdicts a patch file carries.
 */
import { app } from "../../scripts/app.js";

// Forget Train shows its run's verdict; Load and Apply Forget Patch show the one the patch carries.
const NODE_NAMES = ["FMN_ForgetTrain", "FMN_LoadForgetPatch", "FMN_ApplyForgetPatch"];
const WIDGET_NAME = "fmn_verdict";
const STYLE_ID = "fmn-verdict-style";
const STYLE = `
.fmn-verdict { box-sizing: border-box; padding: 4px 6px; font: 12px sans-serif; line-height: 1.35;
  color: var(--input-text, #ddd); overflow-wrap: anywhere; }
.fmn-verdict-warning { color: #ff9a7a; margin-top: 2px; }
`;

function injectStyle() {
  if (document.getElementById(STYLE_ID)) return;
  const style = document.createElement("style");
  style.id = STYLE_ID;
  style.textContent = STYLE;
  document.head.append(style);
}

function line(className, text) {
  const div = document.createElement("div");
  div.className = className;
  div.textContent = text;
  return div;
}

/** Added with the node (the Vue renderer mounts DOM widgets when it first draws a node); empty until a run. */
function addVerdictWidget(node) {
  const holder = document.createElement("div");
  holder.className = "fmn-verdict";
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
    line("fmn-verdict-text", report.verdict),
    ...(report.warnings || []).map((warning) => line("fmn-verdict-warning", `⚠ ${warning}`)),
  );
  const [width, height] = node.computeSize();
  node.setSize([Math.max(width, node.size[0]), Math.max(height, node.size[1])]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "forget_me_not.forget_report",
  setup: injectStyle,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_NAMES.includes(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      addVerdictWidget(this);
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.fmn_report?.length) showVerdict(this, message.fmn_report[0]);
    };
  },
});
