import './style.css';
import { initShortcutsDialog } from './shortcuts.js';

const page = document.body.dataset.page;
initShortcutsDialog();
if (page === 'worklist') {
  import('./worklist.js').then((m) => m.initWorklist());
} else if (page === 'case') {
  import('./case.js').then((m) => m.initCase());
}
