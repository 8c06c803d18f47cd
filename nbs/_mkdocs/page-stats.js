// After load, record on <body> how many images decoded and how many tables the page has (read by tests/test_docs.py).
window.addEventListener('load', () => {
  const b = document.body;
  b.setAttribute('data-images-ok', [...document.images].filter((i) => i.complete && i.naturalWidth > 0).length);
  b.setAttribute('data-tables', document.getElementsByTagName('table').length);
});
