// The console's one script (served from /static: the Content-Security-Policy allows no inline script).
// Pages work without it; it only adds conveniences.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // Change preview: a chosen file is read into the text area (nothing is uploaded until the form is sent).
  const file = document.getElementById("candidate-file");
  const area = document.getElementById("candidate");
  if (file && area) {
    file.addEventListener("change", () => {
      const f = file.files && file.files[0];
      if (!f) return;
      f.text().then((text) => { area.value = text; });
    });
  }
  // Bars: widths from data-w (a share, 0..1), set here rather than in an inline style.
  for (const bar of document.querySelectorAll("span.bar[data-w]")) {
    const w = Math.max(0, Math.min(1, parseFloat(bar.dataset.w) || 0));
    bar.style.width = (w * 12).toFixed(2) + "rem";
  }
});
