// Shift+? opens the keyboard shortcut help on every page.

const NOT_TEXT_INPUTS = new Set(['checkbox', 'radio', 'range', 'button', 'submit', 'reset', 'color', 'file']);

/** Whether a key press goes into a text field (or a form's select), not to the page's shortcuts.
 *  A checkbox, slider or button that merely holds focus after a click does not take them. */
export function isTyping(event) {
  const el = event.target;
  if (!el || !el.tagName) return false;
  if (el.isContentEditable || el.tagName === 'TEXTAREA') return true;
  if (el.tagName === 'INPUT') return !NOT_TEXT_INPUTS.has(el.type);
  if (el.tagName === 'SELECT') return Boolean(el.closest('form, dialog'));
  return false;
}

/** Whether the focused control uses the arrow keys itself (sliders, selects, radio groups). */
export function usesArrows(event) {
  const el = event.target;
  return Boolean(el && (el.tagName === 'SELECT' || (el.tagName === 'INPUT' && ['range', 'radio'].includes(el.type))));
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
