"""Screenshot of the explorer for the docs: docs/images/explorer.png.

Serves the explorer of a DCGAN-faces analysis, opens it in headless Chromium, paints the
centre of the face (the brush stroke of a user) and saves the page once the hybrids of the
channels under the brush are shown. Needs Chromium + chromedriver + selenium, like the
browser tests (whose helpers it uses).

    PYTHONPATH=src python scripts/explorer_screenshot.py [--results out/results.npz] [--out docs/images/explorer.png]

Without ``--results`` a small analysis (16 pairs) is made first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser_helpers import (  # noqa: E402
    find_chromium,
    hybrids_version,
    paint,
    start_chromium,
    wait_for,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", help="results.npz of cfmodules analyze on dcgan-faces")
    p.add_argument("--out", default=str(ROOT / "docs" / "images" / "explorer.png"))
    args = p.parse_args()
    found = find_chromium()
    if isinstance(found, str):
        print(f"cannot take the screenshot: {found}", file=sys.stderr)
        return 2
    from cfmodules.analysis import AnalysisResult, analyze
    from cfmodules.explorer import Explorer, ExplorerServer
    from cfmodules.zoo.dcgan import load_dcgan_faces

    adapter = load_dcgan_faces(device="cpu")
    if args.results:
        result = AnalysisResult.load(args.results)
    else:
        result = analyze(adapter, n_pairs=16, stability_ks=(), n_init=2, progress=False)
    server = ExplorerServer(Explorer(result, adapter), port=0).start()
    drv = start_chromium(*found, width=1280, height=860)
    try:
        drv.get(server.url)
        wait_for(lambda: hybrids_version(drv) >= 1, what="first hybrids")
        h, w = result.maps.shape[1:]
        ys, xs = np.mgrid[0:h, 0:w]
        # the face: an ellipse over the centre of the image (about a fifth of it)
        region = ((ys - 0.52 * h) / (0.28 * h)) ** 2 + ((xs - 0.5 * w) / (0.24 * w)) ** 2 <= 1
        v = hybrids_version(drv)
        paint(drv, region)
        wait_for(lambda: hybrids_version(drv) > v, what="hybrids of the painted region")
        drv.execute_script("document.querySelector('.chip.selected')?.dispatchEvent("
                           "new MouseEvent('mouseenter'))")
        wait_for(lambda: drv.execute_script(
            "const i = document.getElementById('channel-map-img');"
            "return i.complete && i.naturalWidth > 0"), what="channel map")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(out))
        print(f"Screenshot: {out}")
    finally:
        drv.quit()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
