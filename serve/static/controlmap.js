// The ControlNet map: a canvas at the output's own size where the user paints white on black (painter.js) or
// loads an image. Self-contained (no globals besides createControlMap), used by app.js.
"use strict";

// canvas: shown fitted into a square of `box` CSS px (the bundled model's 64 px map enlarged, a 1024 px one reduced).
function createControlMap({ canvas, brushSize, box = 256 }) {
  // White on transparent; the canvas's CSS background and the export put black under it, so the eraser
  // (which makes pixels transparent) paints black.
  const painter = createPainter({ canvas, brushSize, color: "#ffffff" });

  // The map must have the output's size (the server never resizes it). What is painted is stretched along,
  // so a shape drawn on the left stays on the left.
  function resize(width, height) {
    if (canvas.width === width && canvas.height === height) return;
    const old = document.createElement("canvas");
    old.width = canvas.width;
    old.height = canvas.height;
    old.getContext("2d").drawImage(canvas, 0, 0);
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").drawImage(old, 0, 0, width, height);
    fit();
  }

  // Shown with its longest side `box` CSS px, whatever its shape; small maps enlarged without blur.
  function fit() {
    const scale = box / Math.max(canvas.width, canvas.height);
    canvas.style.width = `${Math.round(canvas.width * scale)}px`;
    canvas.style.height = `${Math.round(canvas.height * scale)}px`;
    canvas.classList.toggle("pixelated", scale > 1);
  }

  // Draws `src` (a URL or data URL) over the whole canvas, scaled to its size: the user chose to resize it.
  function load(src) {
    return new Promise((resolve, reject) => {
      const image = new Image();
      image.onload = () => {
        const ctx = canvas.getContext("2d");
        ctx.clearRect(0, 0, canvas.width, canvas.height);
        ctx.imageSmoothingEnabled = true;
        ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
        resolve({ width: image.naturalWidth, height: image.naturalHeight });
      };
      image.onerror = () => reject(new Error("That file is not an image the browser can read."));
      image.src = src;
    });
  }

  // The map as the server gets it: opaque RGB at the canvas's (the output's) size, base64 PNG, no data: prefix.
  function exportMap() {
    const out = document.createElement("canvas");
    out.width = canvas.width;
    out.height = canvas.height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.drawImage(canvas, 0, 0);
    return out.toDataURL("image/png").split(",")[1];
  }

  fit();
  return {
    resize,
    load,
    exportMap,
    clear: painter.clear,
    setTool: painter.setTool,
    get width() { return canvas.width; },
    get height() { return canvas.height; },
  };
}
