import './style.css';
import { initShortcutsDialog } from './shortcuts.js';

const page = document.body.dataset.page;
initShortcutsDialog();
if (page === 'worklist') {
  import('./worklist.js').then((m) => m.initWorklist());
} else if (page === 'inbox') {
  import('./inbox.js').then((m) => m.initInbox());
} else if (page === 'case') {
  import('./case.js').then((m) => m.initCase());
}
