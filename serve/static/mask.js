// The img2img / inpaint input: an image canvas with a mask canvas over it that the user paints on (painter.js).
// Self-contained (no globals besides createMaskEditor), used by app.js.
"use strict";

// imageCanvas and maskCanvas lie on top of each other (CSS); box: the longest canvas side in canvas pixels.
function createMaskEditor({ imageCanvas, maskCanvas, brushSize, box = 384 }) {
  let input = null;       // {dataUrl, width, height}: the image as the server will get it
  // only alpha matters for the exported mask; the colour is for the eye
  const painter = createPainter({ canvas: maskCanvas, brushSize, color: "#ff3d8b", canPaint: () => input !== null });

  // Resolves with {dataUrl, width, height} once `src` (a URL or data URL) is drawn.
  function load(src) {
    return new Promise((resolve, reject) => {
      const image = new Image();
      image.onload = () => {
        // Re-encode as PNG at its own size: the server gets one well-known format whatever was uploaded.
        const flat = document.createElement("canvas");
        flat.width = image.naturalWidth;
        flat.height = image.naturalHeight;
        flat.getContext("2d").drawImage(image, 0, 0);
        input = { dataUrl: flat.toDataURL("image/png"), width: flat.width, height: flat.height };
        // Paint at screen resolution, not image resolution: a 64 px image would give blocky strokes.
        const scale = box / Math.max(flat.width, flat.height);
        for (const canvas of [imageCanvas, maskCanvas]) {
          canvas.width = Math.round(flat.width * scale);
          canvas.height = Math.round(flat.height * scale);
        }
        const ctx = imageCanvas.getContext("2d");
        ctx.imageSmoothingEnabled = scale < 1;  // small images (the bundled model's 64 px) stay crisp
        ctx.drawImage(image, 0, 0, imageCanvas.width, imageCanvas.height);
        painter.clear();
        resolve(input);
      };
      image.onerror = () => reject(new Error("That file is not an image the browser can read."));
      image.src = src;
    });
  }

  // The mask at the input image's size, black = keep and white = repaint, as base64 PNG (no data: prefix);
  // null when nothing is painted.
  function exportMask() {
    if (!input || !painter.painted) return null;
    const out = document.createElement("canvas");
    out.width = input.width;
    out.height = input.height;
    const ctx = out.getContext("2d");
    ctx.drawImage(maskCanvas, 0, 0, input.width, input.height);
    const pixels = ctx.getImageData(0, 0, input.width, input.height);
    const d = pixels.data;
    let any = false;
    for (let i = 0; i < d.length; i += 4) {
      const on = d[i + 3] >= 64;  // a pixel a quarter covered by the brush counts as painted
      any = any || on;
      d[i] = d[i + 1] = d[i + 2] = on ? 255 : 0;
      d[i + 3] = 255;
    }
    if (!any) return null;  // everything erased again
    ctx.putImageData(pixels, 0, 0);
    return out.toDataURL("image/png").split(",")[1];
  }

  return {
    load,
    clear: painter.clear,
    exportMask,
    setTool: painter.setTool,
    get input() { return input; },
  };
}
