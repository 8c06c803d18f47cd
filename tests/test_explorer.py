"""The live explorer of nbs/94_explore_concepts.ipynb: executed headless with its widget state, exported to HTML and
rendered offline by @jupyter-widgets/html-manager (`make widgets-js`) in Debian's Chromium."""
import re, shutil, subprocess
from pathlib import Path

import nbformat, pytest
from nbclient import NotebookClient
from nbconvert import HTMLExporter

from concept_nb.checkpoints import save_model
from concept_nb.core import repo_root
from concept_nb.data import load_tokenizer
from concept_nb.glue import tiny_config
from concept_nb.heads import build_model

ROOT = repo_root(Path(__file__))
EMBED_JS = ROOT/'.cache'/'html-manager'/'package'/'dist'/'embed.js'
CHROMIUM = next((shutil.which(b) for b in ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')
                 if shutil.which(b)), None)
RUN = '2026-11-21_perceiver_mlm_H128L2C16_20261121_073739'   # a committed pretraining record, given tiny weights here
PICK = f"""ui = live_explorer(models, 'A dog runs in the park.')
ui.children[0].children[0].value = {RUN!r}   # pick the registry's run: its model loads, the menus follow its shape
display(ui)"""
SETUP = """from concept_nb.glue import tiny_config
tok = load_tokenizer('embedded')
model = build_model('perceiver_mlm', tiny_config(tok, concept_num=6, num_attention_heads=2)).eval()
names, sentences = ('tiny',), ['A first sentence.', 'The cat sat on the mat by the kitchen door.']"""


def _cells(nb, start:str) -> str:
    "Source of the cell of nbs/94 that starts with `start` (the test follows the notebook's own code)."
    src = [c.source for c in nb.cells if c.cell_type == 'code' and c.source.startswith(start)]
    assert len(src) == 1, f"94_explore_concepts.ipynb: expected one code cell starting with {start!r}"
    return src[0]


@pytest.fixture(scope='module')
def explorer_html(tmp_path_factory):
    if CHROMIUM is None: pytest.skip("no Chromium found (Debian: apt-get install -y chromium; `make browser`)")
    if not EMBED_JS.is_file(): pytest.skip(f"{EMBED_JS} missing: `make widgets-js` fetches it with npm")
    src = nbformat.read(ROOT/'nbs'/'94_explore_concepts.ipynb', as_version=4)
    tmp = tmp_path_factory.mktemp('explorer')
    (tmp/'nbs').mkdir()
    for f in ('', '.ipynb'):   # a registry of one completed pretraining run with weights on disk: the record of RUN
        (shutil.copytree if not f else shutil.copy)(ROOT/'runs'/(RUN + f), tmp/'runs'/(RUN + f))
    tok = load_tokenizer('embedded')
    save_model(build_model('perceiver_mlm', tiny_config(tok, num_hidden_layers=3, num_attention_heads=4)), tok,
               tmp/'runs'/RUN/'model')
    nb = nbformat.v4.new_notebook(metadata=src.metadata)
    cells = ('seed = 0', _cells(src, 'import copy'), SETUP,                  # 94's imports, a tiny model, the explorer
             _cells(src, '# The live explorer'), _cells(src, 'def live_explorer'), PICK)
    nb.cells = [nbformat.v4.new_code_cell(s) for s in cells]
    NotebookClient(nb, timeout=120, kernel_name='python3', store_widget_state=True,
                   resources={'metadata': {'path': str(tmp/'nbs')}}).execute()   # the explorer reads ../runs
    (tmp/'stub.js').write_text('')   # require.js / MathJax would come from a CDN: not needed by embed.js
    ex = HTMLExporter(template_name='lab', widget_renderer_url=EMBED_JS.as_uri(),
                      require_js_url=(tmp/'stub.js').as_uri(), mathjax_url=(tmp/'stub.js').as_uri(), exclude_input=True)
    html, _ = ex.from_notebook_node(nb)
    (tmp/'explorer.html').write_text(html)
    return nb, tmp/'explorer.html'


def _browser(*args, tmp):
    cmd = [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--hide-scrollbars', '--allow-file-access-from-files',
           '--virtual-time-budget=8000', f'--user-data-dir={tmp}', *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_headless_run_keeps_widgets_and_static_views(explorer_html):
    nb, _ = explorer_html
    state = nb.metadata.widgets['application/vnd.jupyter.widget-state+json']['state']
    kinds = sorted({m['model_name'] for m in state.values()})
    assert {'DropdownModel', 'TextModel', 'OutputModel', 'VBoxModel'} <= set(kinds), kinds
    pngs = lambda outs: sum('image/png' in o.get('data', {}) for o in outs)
    assert [pngs(m['state']['outputs']) for m in state.values() if m['model_name'] == 'OutputModel'] == [3, 3]  # live
    assert pngs(nb.cells[-2].outputs) == 3                                           # and static (no Jupyter server)
    menus = [m['state'] for m in state.values() if m['model_name'] == 'DropdownModel']
    models = [m for m in menus if m['description'] == 'model']
    assert [m['_options_labels'] for m in models] == [['tiny (this notebook)', RUN]] * 2 and models[1]['index'] == 1
    # the notebook's model (2 layers, 2 heads), then the registry's run once picked (3 layers, 4 heads)
    assert [m['_options_labels'] for m in menus if m['description'] == 'layer'] == [['last', 'mean', '0', '1'],
                                                                                     ['last', 'mean', '0', '1', '2']]
    assert [len(m['_options_labels']) for m in menus if m['description'] == 'head'] == [3, 5]


def test_widgets_render_in_browser(explorer_html, tmp_path):
    _, page = explorer_html
    r = _browser('--dump-dom', page.as_uri(), tmp=tmp_path/'profile')
    assert r.returncode == 0 and '<body' in r.stdout, r.stderr[-2000:]
    dom = r.stdout
    # classes that only the html-manager's rendering creates (the saved HTML holds just the JSON state)
    for cls in ('widget-dropdown', 'widget-text', 'widget-output', 'widget-vbox'):
        assert f'{cls}' in dom, f"{cls} not rendered; page holds {sorted(set(re.findall(r'widget-[a-z]+', dom)))}"
    assert dom.count('<select') >= 6                                   # model, layer, head of both explorers
    assert dom.count('<img') >= 9, dom.count('<img')                    # 3 views in each output widget + 3 static ones
    shot = tmp_path/'explorer.png'
    r = _browser(f'--screenshot={shot}', '--window-size=1200,1600', page.as_uri(), tmp=tmp_path/'profile2')
    assert r.returncode == 0 and shot.is_file() and shot.stat().st_size > 20_000, r.stderr[-2000:]
