// Freehand painting on a canvas (brush and eraser), shared by the inpaint mask (mask.js) and the control map
// (controlmap.js). Self-contained (no globals besides createPainter).
"use strict";

// Paints `color` on `canvas`; the eraser makes pixels transparent again, so whoever exports the canvas decides
// what "nothing painted" means (the mask: keep; the control map: black). brushSize: an <input> whose value is
// the brush diameter in canvas pixels. canPaint: whether a stroke may start now.
function createPainter({ canvas, brushSize, color, canPaint = () => true }) {
  let tool = "brush";
  let painted = false;  // anything painted since the last clear (erasing back to nothing is the exporter's to see)

  function clear() {
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    painted = false;
  }

  // Pointer events cover mouse, pen and touch alike.
  let last = null;
  const at = (event) => {
    const rect = canvas.getBoundingClientRect();  // the canvas is scaled by CSS: map to canvas pixels
    return {
      x: (event.clientX - rect.left) * (canvas.width / rect.width),
      y: (event.clientY - rect.top) * (canvas.height / rect.height),
    };
  };
  const stroke = (from, to) => {
    const ctx = canvas.getContext("2d");
    ctx.globalCompositeOperation = tool === "eraser" ? "destination-out" : "source-over";
    ctx.strokeStyle = color;
    ctx.lineWidth = Number(brushSize.value);
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);  // a zero-length line draws nothing; a click should leave a dot
    ctx.stroke();
    ctx.globalCompositeOperation = "source-over";  // drawImage by others (loading, resizing) must not erase
    if (tool === "brush") painted = true;
  };
  canvas.addEventListener("pointerdown", (event) => {
    if (!canPaint()) return;
    canvas.setPointerCapture(event.pointerId);
    last = at(event);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const point = at(event);
    stroke(last, point);
    last = point;
  });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);

  return {
    clear,
    setTool: (name) => { tool = name; },
    get painted() { return painted; },
  };
}
