"""``bench/page_memory.py``: each cell's peak is the kernel's own high-water mark during that cell."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import page_memory  # noqa: E402

PAGE = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# A page

```{code-cell} ipython3
import numpy as np
```

```{code-cell} ipython3
big = np.ones(300 * 2**20 // 8)   # 300 MiB, touched
del big
```

```{code-cell} ipython3
:tags: [starter]
raise RuntimeError("a starter cell is not executed, as in the book")
```

```{code-cell} ipython3
small = np.ones(10)
```
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_a_cell_that_allocates_300_mib_peaks_300_mib_above_its_neighbours(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    cells = page_memory.measure(page)
    assert [c["first_line"] for c in cells] == ["import numpy as np", "big = np.ones(300 * 2**20 // 8)   # 300 MiB, touched",
                                                "small = np.ones(10)"]
    heavy, light = cells[1]["peak"], cells[2]["peak"]
    assert 280 * 2**20 < heavy - light < 400 * 2**20        # the next cell's high-water mark was reset
    assert cells[1]["left"] < heavy - 200 * 2**20           # freed after the cell
