/**
 * Small pieces the pack's frontend extensions share: one stylesheet per page, elements with a
 * class, and the two node hooks they chain onto (the front end loads this file as an
 * extension too; it registers nothing).
 */

/** One stylesheet per page, however many of the pack's nodes there are. */
export function injectStyle(id, css) {
  if (document.getElementById(id)) return;
  const style = document.createElement("style");
  style.id = id;
  style.textContent = css;
  document.head.append(style);
}

export function element(tag, className, text) {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Chain `created(node)` onto node creation and `executed(node, message)` onto each run's UI message. */
export function hookNode(nodeType, created, executed) {
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    onNodeCreated?.apply(this, arguments);
    created(this);
  };
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    onExecuted?.apply(this, arguments);
    executed(this, message);
  };
}
