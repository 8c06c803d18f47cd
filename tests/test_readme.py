from concept_nb.core import repo_root
from concept_nb.docs import readme_text

def test_readme_is_generated_from_index():
    root = repo_root(__file__)
    assert (root / 'README.md').read_text() == readme_text(root), "README.md drifted from nbs/index.ipynb: run `make readme`"
