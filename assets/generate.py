"""Redraw the synthetic example scenes in this folder: `python assets/generate.py`.

numpy + PIL (and, for `generated_shapes.jpg`, the project's shapes generator), seeded, so the
files come out the same each time (CC0, see README.md).
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).parent
W, H = 640, 480
rng = np.random.default_rng(0)


def gradient(top, bottom, height, width):
    t = np.linspace(0, 1, height)[:, None, None]
    return (np.array(top) * (1 - t) + np.array(bottom) * t) * np.ones((1, width, 1))


def noisy(img, sigma):
    a = np.asarray(img).astype(np.float32)
    a += rng.normal(0, sigma, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def street():
    sky = gradient((110, 170, 235), (200, 225, 250), 300, W)
    ground = gradient((90, 150, 70), (60, 120, 50), H - 300, W)
    img = Image.fromarray(np.concatenate([sky, ground]).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse((520, 40, 590, 110), fill=(255, 220, 80))                       # sun
    d.polygon([(0, 480), (640, 480), (640, 380), (0, 400)], fill=(80, 80, 85))  # road
    for x in range(20, 640, 80):
        d.rectangle((x, 425, x + 40, 430), fill=(235, 235, 220))
    d.rectangle((60, 180, 260, 320), fill=(200, 90, 70))                       # house
    d.polygon([(40, 185), (160, 100), (280, 185)], fill=(110, 60, 50))          # roof
    d.rectangle((140, 250, 180, 320), fill=(90, 60, 40))                        # door
    for x0 in (80, 200):
        d.rectangle((x0, 210, x0 + 40, 245), fill=(170, 210, 240), outline=(250, 250, 250),
                    width=3)
    d.rectangle((400, 220, 420, 320), fill=(100, 70, 40))                       # tree trunk
    d.ellipse((350, 120, 470, 240), fill=(40, 120, 45))                         # tree crown
    d.rounded_rectangle((300, 365, 470, 415), radius=12, fill=(30, 90, 200))     # car body
    d.polygon([(335, 365), (360, 335), (420, 335), (445, 365)], fill=(30, 90, 200))
    d.polygon([(345, 363), (365, 340), (415, 340), (435, 363)], fill=(180, 220, 245))
    for cx in (335, 435):
        d.ellipse((cx - 20, 397, cx + 20, 437), fill=(20, 20, 20))
        d.ellipse((cx - 8, 409, cx + 8, 425), fill=(160, 160, 160))
    return noisy(img.filter(ImageFilter.GaussianBlur(0.8)), 4)


def fruit():
    img = Image.fromarray(gradient((235, 228, 215), (215, 205, 190), H, W).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 300, 640, 480), fill=(150, 100, 60))                         # table
    for y in range(310, 480, 24):
        d.line((0, y, 640, y + 6), fill=(130, 85, 50), width=2)
    d.ellipse((150, 250, 490, 380), fill=(245, 245, 240))                       # bowl
    d.chord((150, 200, 490, 380), 0, 180, fill=(235, 235, 228))
    for cx, cy, color in ((250, 255, (200, 30, 35)), (320, 245, (180, 25, 30)),
                          (390, 260, (120, 190, 40))):
        d.ellipse((cx - 42, cy - 42, cx + 42, cy + 42), fill=color)              # apples
        d.ellipse((cx - 22, cy - 28, cx - 8, cy - 14), fill=(255, 235, 235))
        d.line((cx, cy - 42, cx + 6, cy - 58), fill=(90, 60, 30), width=4)
    d.arc((440, 280, 620, 460), 200, 320, fill=(240, 210, 50), width=26)        # banana
    d.ellipse((60, 330, 130, 400), fill=(250, 150, 30))                         # orange
    d.rectangle((540, 120, 600, 300), fill=(120, 180, 220))                     # glass
    d.rectangle((545, 180, 595, 295), fill=(90, 150, 200))
    return noisy(img.filter(ImageFilter.GaussianBlur(0.8)), 3)


def shapes():
    img = Image.fromarray(gradient((60, 60, 70), (30, 30, 38), H, W).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse((60, 180, 200, 320), fill=(220, 40, 40))                          # red ball
    d.ellipse((95, 205, 130, 240), fill=(250, 150, 150))
    d.rectangle((260, 150, 400, 290), fill=(40, 90, 220))                       # blue box
    d.polygon([(260, 150), (300, 120), (440, 120), (400, 150)], fill=(90, 140, 240))
    d.polygon([(400, 150), (440, 120), (440, 260), (400, 290)], fill=(30, 60, 170))
    d.polygon([(470, 330), (610, 330), (540, 190)], fill=(40, 190, 80))          # green triangle
    d.ellipse((200, 360, 260, 420), fill=(240, 200, 40))                        # yellow ball
    return noisy(img.filter(ImageFilter.GaussianBlur(0.6)), 3)


def generated_shapes():
    """An image of the offline models' training distribution (`grounding.shapes_data`), from a
    seed no split uses: a red circle, a green triangle, a green circle and a yellow triangle
    among grey clutter."""
    sys.path.insert(0, str(OUT.parent))
    from grounding.shapes_drawing import generate_image

    sample = generate_image(np.random.default_rng([7, 4]), min_side=480, max_side=640,
                            min_shapes=4, max_shapes=4)
    return Image.fromarray(sample.image)


if __name__ == "__main__":
    for name, draw in (("street.jpg", street), ("fruit.jpg", fruit), ("shapes.jpg", shapes),
                       ("generated_shapes.jpg", generated_shapes)):
        draw().save(OUT / name, quality=88, optimize=True)
