"""docs/deformable_attention.md runs: its python blocks, in order, in one namespace."""
import os
import re

import torch

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "deformable_attention.md")


def python_blocks(path):
    with open(path, encoding="utf-8") as markdown:
        return re.findall(r"^```python\n(.*?)^```$", markdown.read(), flags=re.DOTALL | re.MULTILINE)


def test_the_walkthrough_runs_and_holds():
    blocks = python_blocks(DOC)
    assert len(blocks) >= 5
    namespace = {"__name__": "deformable_attention_doc"}
    for index, block in enumerate(blocks):
        exec(compile(block, f"{DOC} (python block {index + 1})", "exec"), namespace)
    # the two worked examples, checked again here in case the page's own asserts are edited away
    assert "reference" in namespace["implementations"]
    assert namespace["sampled"].shape == (1, 8, 16) and namespace["sampled"].dtype == torch.float64
    assert namespace["reference"].tolist() == [1.5, 1.5]
    assert namespace["weights"].flatten().tolist() == [0.25] * 4
    z = namespace["z"]
    mean_of_four = (z[2, 2] + z[2, 1] + z[1, 2] + z[1, 1]) / 4
    for implementation in namespace["implementations"]:
        output = namespace["ms_deform_attn"](
            namespace["value"], namespace["spatial_shapes"], namespace["level_start_index"], namespace["locations"],
            namespace["weights"], implementation=implementation,
        )
        assert torch.equal(output[0, 0], mean_of_four), implementation
