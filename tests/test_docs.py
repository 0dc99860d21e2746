"""The documentation's shape: a short README that leads with the two commands, and no dead link or anchor in the
README, ARTIFACT.md, ARCHITECTURE.md, CHANGELOG.md or docs/."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "ARTIFACT.md", "ARCHITECTURE.md", "CHANGELOG.md",
         *sorted(str(f.relative_to(REPO)) for f in (REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped (hyphens and underscores kept), spaces -> '-'."""
    out = set()
    in_code = False
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6} (.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_readme_is_short_and_leads_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    head = "\n".join(lines[:40])
    assert "make run" in head and "make test" in head


def test_no_dead_links_or_anchors():
    dead = []
    for page in PAGES:
        src = REPO / page
        for target in LINK.findall(src.read_text()):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked (no network)
                continue
            path, _, frag = target.partition("#")
            dest = (src.parent / path).resolve() if path else src
            if not dest.exists():
                dead.append(f"{page}: {target} (no {path})")
            elif frag and dest.suffix == ".md" and frag not in anchors(dest):
                dead.append(f"{page}: {target} (no heading #{frag})")
    assert not dead, "\n".join(dead)


def test_anchor_rule():
    f = REPO / "docs" / "usage.md"
    assert {"install-without-make", "second-model-qwen25-coder-05b-instruct", "evaluation-data"} <= anchors(f)
