"""`make lint`: ruff with the project's config, less the E501 findings inside a module's `__all__` block.

nbdev writes each module's `__all__ = [...]` itself (lines of up to ~160 characters), so those lines cannot be
wrapped in the notebooks. Every other finding is printed in ruff's concise format, and any left make the exit status 1.
Usage: python .ci/lint.py [RUFF] [PATH ...]   (defaults: the `ruff` next to this Python, concept_nb tests benchmarks)
"""
import ast, json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def all_block_lines(path):
    "The line numbers of the top-level `__all__ = ...` assignment(s) in the Python file `path`."
    try: tree = ast.parse(Path(path).read_text(encoding='utf-8'))
    except (OSError, SyntaxError, ValueError): return set()
    lines = set()
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign) else
                   [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == '__all__' for t in targets):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines

def main(argv):
    ruff = argv[0] if argv and not Path(argv[0]).is_dir() else str(Path(sys.executable).parent / 'ruff')
    paths = [a for a in argv if Path(a).is_dir() or a.endswith('.py')] or ['concept_nb', 'tests', 'benchmarks']
    if not Path(ruff).exists(): ruff = 'ruff'
    p = subprocess.run([ruff, 'check', '--output-format', 'json', *paths], cwd=ROOT, capture_output=True, text=True)
    if p.returncode not in (0, 1): sys.exit(p.stderr or f'ruff exited with status {p.returncode}')
    blocks, kept = {}, []
    for f in json.loads(p.stdout or '[]'):
        fn, row = f['filename'], f['location']['row']
        if f['code'] == 'E501':
            if fn not in blocks: blocks[fn] = all_block_lines(fn)
            if row in blocks[fn]: continue
        kept.append(f)
    for f in sorted(kept, key=lambda f: (f['filename'], f['location']['row'], f['location']['column'])):
        fn = Path(f['filename'])
        try: fn = fn.relative_to(ROOT)
        except ValueError: pass
        print(f"{fn}:{f['location']['row']}:{f['location']['column']}: {f['code']} {f['message']}")
    if kept: print(f'Found {len(kept)} error{"s" if len(kept) != 1 else ""}.')
    return 1 if kept else 0

if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
