"""Rebuild template.html: the HTML template `dvc plots show` fills (see .dvc/config,
[plots] html_template), with vega, vega-lite and vega-embed inlined so the page it
writes renders with no network. DVC's default page loads them from a CDN instead.

    cd plots/offline && npm pack vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
    python build.py vega-5.33.1.tgz vega-lite-5.23.0.tgz vega-embed-6.29.0.tgz

The tarballs must match the sha256 below (the npm registry's files, 2026-11-29). Each
library goes in as its published minified build, unchanged, under a comment naming its
version and licence (BSD-3-Clause; full texts and bundled third-party notices in
LICENSE). DVC substitutes {plot_divs} and {refresh_tag} in the template; the build checks
that no library contains either text, nor a closing script tag.
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
from pathlib import Path

PACKAGES = {  # name: (version, file in the package, sha256 of the npm tarball, years of its LICENSE's copyright)
    "vega": ("5.33.1", "package/build/vega.min.js", "1b8504b6731c5311be3269c4d84ca996a5cc293bc772283293ede20c490e16c3", "2015-2023"),
    "vega-lite": ("5.23.0", "package/build/vega-lite.min.js", "e4cbfdd8f6f1abe381c59cd558fd6a559c12b1496bfdf2e0c3295263a40fe4da", "2015"),
    "vega-embed": ("6.29.0", "package/build/vega-embed.min.js", "ecf1ee709c2bac9e0a4ead6908114b05b62c71493e10a8a4308109bb070f8eb1", "2015"),
}
FORBIDDEN = ("{plot_divs}", "{refresh_tag}", "{scripts}", "</script")
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- MultiFusion's offline template for `dvc plots show` (plots/offline/build.py): the
         three libraries below are inlined, unchanged, so this page needs no network.
         Licences: plots/offline/LICENSE. -->
{scripts}
    <style>
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def library(tarball: Path, name: str) -> str:
    version, member, sha256, years = PACKAGES[name]
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != sha256:
        sys.exit(f"{tarball}: sha256 {digest} is not the pinned {sha256} of {name}@{version}; run `npm pack {name}@{version}`")
    with tarfile.open(tarball) as tar:
        code = tar.extractfile(member).read().decode("utf-8")
    bad = [text for text in FORBIDDEN if text in code]
    if bad:
        sys.exit(f"{tarball}: {member} contains {bad}; it cannot be inlined into a DVC template")
    notice = f"/*! {name}@{version} | BSD-3-Clause | Copyright (c) {years}, University of Washington Interactive Data Lab | https://github.com/vega/{name} */"
    return f"    <script>{notice}\n{code}\n</script>"


def main() -> None:
    tarballs = [Path(p) for p in sys.argv[1:]]
    if len(tarballs) != len(PACKAGES):
        sys.exit(__doc__)
    by_name = {name: next((t for t in tarballs if t.name == f"{name}-{v[0]}.tgz"), None) for name, v in PACKAGES.items()}
    missing = [f"{n}-{PACKAGES[n][0]}.tgz" for n, t in by_name.items() if t is None]
    if missing:
        sys.exit(f"missing tarball(s) {missing}; run `npm pack` as in this script's docstring")
    scripts = "\n".join(library(by_name[name], name) for name in PACKAGES)  # order matters: vega, vega-lite, vega-embed
    out = Path(__file__).with_name("template.html")
    out.write_text(PAGE.replace("{scripts}", scripts, 1), encoding="utf-8")
    print(f"{out}: {out.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
