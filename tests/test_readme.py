"""The README's Python snippet runs as written, next to a checkpoint and a photo of those names."""
import os
import re

from inference_fixtures import make_checkpoint, make_image

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_the_python_api_snippet_runs(tmp_path, monkeypatch, capsys):
    with open(README) as f:
        blocks = re.findall(r"^```python\n(.*?)^```$", f.read(), flags=re.DOTALL | re.MULTILINE)
    snippet = next(block for block in blocks if "Detector.from_checkpoint" in block)
    make_checkpoint(str(tmp_path / "checkpoint_best.pth"))
    make_image(str(tmp_path / "photo.jpg"), 96, 72)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet.replace("score_threshold=0.3", "score_threshold=0.0"), README, "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(namespace["result"]) == 60  # every one of the top 60 (10 queries x 6 classes) at threshold 0
    assert re.fullmatch(r"\w+ 0\.\d\d at \[-?\d+, -?\d+, \d+, \d+\]", printed[0]), printed[0]
