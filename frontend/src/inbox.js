// Second-opinion inbox: answering a request sends the opinion and closes it.
import { api } from './api.js';

export function initInbox() {
  for (const form of document.querySelectorAll('.answer-form')) {
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      const error = form.querySelector('.error');
      const button = form.querySelector('button[type=submit]');
      button.disabled = true;
      try {
        await api(`/api/v1/second-opinions/${form.dataset.opinion}/answer`, {
          method: 'POST',
          body: { answer: form.elements.answer.value },
        });
        const card = form.closest('.opinion');
        form.replaceWith(Object.assign(document.createElement('p'), { className: 'sent', textContent: 'Opinion sent ✓' }));
        card.classList.add('done');
        const count = document.getElementById('inbox-count');
        count.textContent = String(Math.max(0, Number(count.textContent) - 1));
      } catch (e) {
        error.textContent = e.message;
        error.hidden = false;
        button.disabled = false;
      }
    });
  }
}
