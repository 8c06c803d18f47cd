from concept_nb.core import repo_root
from concept_nb.docs import readme_text

def test_readme_is_generated_from_index():
    root = repo_root(__file__)
    assert (root / 'README.md').read_text() == readme_text(root), \
        "README.md drifted from nbs/index.ipynb: run `make readme`"


def test_readme_first_example_runs_when_pasted():
    "The first Python block of the README carries its own imports: pasted into a fresh interpreter, it runs."
    import re, subprocess, sys
    md = (repo_root(__file__) / 'README.md').read_text()
    code = re.search(r'```python\n(.*?)```', md, re.S).group(1)
    r = subprocess.run([sys.executable, '-c', code + '\nprint(out.concepts.shape)'], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'torch.Size([2, 8, 64])' in r.stdout
