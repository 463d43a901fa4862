/**
 * Attention Map Viewer on the canvas: after a run, the node shows its per-word heatmap
 * overlays as a grid (one column per model, "before" / "after"), so the effect of a forget
 * patch on each word is visible without wiring preview nodes. Click a map to enlarge it.
 */
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { element, hookNode, injectStyle } from "./fmn_dom.js";

const NODE_NAME = "FMN_AttentionMapViewer";
const WIDGET_NAME = "fmn_attention_maps";
const STYLE_ID = "fmn-attention-style";
const MIN_HEIGHT = 160;

const STYLE = `
.fmn-attention-grid { display: flex; gap: 8px; box-sizing: border-box; padding: 4px;
  font: 12px sans-serif; color: var(--input-text, #ddd); }
.fmn-attention-column { flex: 1 1 0; min-width: 0; display: grid; align-content: start; gap: 6px;
  grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)); }
.fmn-attention-heading { grid-column: 1 / -1; margin: 0; font-size: 13px; font-weight: bold; text-align: center;
  text-transform: capitalize; }
.fmn-attention-cell { margin: 0; cursor: zoom-in; text-align: center; }
.fmn-attention-cell img { display: block; width: 100%; aspect-ratio: 1; object-fit: contain;
  image-rendering: pixelated; border-radius: 4px; transition: transform 0.15s; }
.fmn-attention-cell:hover img { position: relative; z-index: 1; transform: scale(1.25);
  box-shadow: 0 2px 10px #000a; }
.fmn-attention-word { margin-top: 2px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.fmn-attention-zoom { position: fixed; inset: 0; z-index: 10000; display: flex; flex-direction: column;
  align-items: center; justify-content: center; gap: 8px; background: #000c; cursor: zoom-out;
  font: 18px sans-serif; color: #fff; }
.fmn-attention-zoom img { width: min(80vw, 80vh); height: min(80vw, 80vh); object-fit: contain;
  image-rendering: pixelated; }
`;

/** The server's /view URL for a file the node wrote (through api so a base path is honoured). */
function viewUrl({ filename, subfolder = "", type = "temp" }) {
  return api.apiURL(`/view?${new URLSearchParams({ filename, subfolder, type })}`);
}

function mapImage(entry) {
  const img = document.createElement("img");
  img.src = viewUrl(entry);
  img.alt = `${entry.word} (${entry.model})`;
  return img;
}

let zoom = null;

function closeZoom() {
  zoom?.remove();
  zoom = null;
  document.removeEventListener("keydown", closeOnEscape);
}

function closeOnEscape(event) {
  if (event.key === "Escape") closeZoom();
}

/** A page-level overlay, so the map is shown large whatever the canvas zoom is. */
function openZoom(entry) {
  closeZoom();
  zoom = element("div", "fmn-attention-zoom");
  zoom.dataset.word = entry.word;
  zoom.dataset.model = entry.model;
  zoom.append(mapImage(entry), element("div", "fmn-attention-word", `${entry.word} · ${entry.model}`));
  zoom.addEventListener("click", closeZoom);
  document.addEventListener("keydown", closeOnEscape);
  document.body.append(zoom);
}

function cell(entry) {
  const figure = element("figure", "fmn-attention-cell");
  figure.dataset.word = entry.word;
  figure.dataset.model = entry.model;
  figure.title = `${entry.word} (${entry.model}): click to enlarge`;
  figure.append(mapImage(entry), element("figcaption", "fmn-attention-word", entry.word));
  figure.addEventListener("click", () => openZoom(entry));
  return figure;
}

/** One model's maps in word order; the heading only matters when there is a model to compare with. */
function column(model, entries, withHeading) {
  const div = element("div", "fmn-attention-column");
  div.dataset.model = model;
  if (withHeading) div.append(element("h4", "fmn-attention-heading", model));
  div.append(...entries.map(cell));
  return div;
}

function grid(entries) {
  const models = [...new Set(entries.map((entry) => entry.model))];
  const div = element("div", "fmn-attention-grid");
  div.append(...models.map((model) => column(model, entries.filter((e) => e.model === model), models.length > 1)));
  return div;
}

/** Grow the node (never shrink it) so every widget, the maps included, fits. */
function growToFit(node) {
  const [width, height] = node.computeSize();
  node.setSize([Math.max(width, node.size[0]), Math.max(height, node.size[1])]);
  node.setDirtyCanvas(true, true);
}

/**
 * The (empty) widget is added when the node is created: the Vue node renderer ("Nodes 2.0")
 * mounts a node's DOM widgets when it first draws the node, so one added later would never
 * show there. It reserves no height until there are maps; then it asks the canvas for the
 * grid's real height, measured once the browser has laid it out (the number of rows depends
 * on the node's width), and grows the node to show it.
 */
function addMapsWidget(node) {
  const holder = element("div", "fmn-attention-widget");
  const widget = node.addDOMWidget(WIDGET_NAME, "fmn_attention", holder, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => widget.contentHeight + (widget.contentHeight ? 2 * widget.margin : 0),
  });
  widget.serialize = false;
  widget.contentHeight = 0;
  widget.gridObserver = new ResizeObserver(([entry]) => {
    const height = Math.ceil(entry.target.offsetHeight);
    if (height > 0 && height !== widget.contentHeight) {
      widget.contentHeight = height;
      growToFit(node);
    }
  });
  return widget;
}

/** Reuse the node's one widget, so each run replaces the previous maps instead of stacking them. */
function showMaps(node, entries) {
  const widget = node.widgets.find((w) => w.name === WIDGET_NAME);  // added with the node (onNodeCreated)
  const content = grid(entries);
  widget.element.replaceChildren(content);
  widget.contentHeight ||= MIN_HEIGHT;  // until the browser has measured the grid
  growToFit(node);
  widget.gridObserver.disconnect();
  widget.gridObserver.observe(content);
}

app.registerExtension({
  name: "forget_me_not.attention_maps",
  setup: () => injectStyle(STYLE_ID, STYLE),
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_NAME) return;
    hookNode(nodeType, addMapsWidget, (node, message) => {
      if (message?.fmn_attention?.length) showMaps(node, message.fmn_attention);
    });
  },
});
