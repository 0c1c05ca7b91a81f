"""ShapesWorld's drawing: a scene (owl_jax.demo.scenes.sample_scene) as a 224x224 RGB image."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 224

COLOURS = {  # RGB
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 180),
    "orange": (250, 140, 30),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}


_FONT_CACHE: dict = {}


def _font(size: int):
    if size not in _FONT_CACHE:
        _FONT_CACHE[size] = ImageFont.load_default(size=size)
    return _FONT_CACHE[size]


def _star(cx, cy, r):
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else 0.45 * r
        a = -np.pi / 2 + i * np.pi / 5
        pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
    return pts


def render_scene(scene: dict, size: int = IMAGE_SIZE) -> Image.Image:
    """Draws a scene as an RGB image (deterministic: noise comes from the scene's own seed)."""
    bg = scene["background"]
    if bg["kind"] == "noise":
        noise = np.random.default_rng(bg["seed"]).normal(0.0, 18.0, (IMAGE_SIZE, IMAGE_SIZE, 3))
        img = Image.fromarray(np.clip(bg["grey"] + noise, 0, 255).astype(np.uint8))
    else:
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (bg["grey"],) * 3)
    draw = ImageDraw.Draw(img)
    for s in scene["shapes"]:
        x, y, r, fill = s["x"], s["y"], s["r"], COLOURS[s["colour"]]
        if s["shape"] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif s["shape"] == "square":
            h = round(r * 0.85)
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        elif s["shape"] == "triangle":
            draw.polygon([(x, y - r), (x + 0.95 * r, y + 0.75 * r), (x - 0.95 * r, y + 0.75 * r)], fill=fill)
        else:
            draw.polygon(_star(x, y, r), fill=fill)
    if scene["word"]:
        draw.text((IMAGE_SIZE // 2, IMAGE_SIZE // 2), scene["word"], fill=(0, 0, 0), font=_font(26), anchor="mm")
    if size != IMAGE_SIZE:
        img = img.resize((size, size), Image.BICUBIC)
    return img


def encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()
