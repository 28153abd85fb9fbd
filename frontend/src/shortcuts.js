// Shift+? opens the keyboard shortcut help on every page.

export function isTyping(event) {
  const el = event.target;
  return el && (el.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(el.tagName));
}

export function initShortcutsDialog() {
  const dialog = document.getElementById('shortcuts-dialog');
  if (!dialog) return;
  const open = () => (dialog.open ? dialog.close() : dialog.showModal());
  document.querySelector('[data-action="shortcuts"]')?.addEventListener('click', open);
  document.addEventListener('keydown', (event) => {
    if (event.key === '?' && !isTyping(event)) {
      event.preventDefault();
      open();
    }
  });
}
