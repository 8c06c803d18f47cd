// Render the math that pymdownx.arithmatex marks (class "arithmatex", \( \) and \[ \] delimiters) with the vendored KaTeX.
document$.subscribe(({ body }) => {
  body.querySelectorAll('.arithmatex').forEach((el) => renderMathInElement(el, {
    delimiters: [{ left: '\\(', right: '\\)', display: false }, { left: '\\[', right: '\\]', display: true }],
    throwOnError: false,
  }));
});
