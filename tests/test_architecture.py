"""The layout: imports run one way (formats -> kernels -> ops -> models -> quant / diffusion / serving ->
checkpoint -> calib -> cli), with no cycle, read from the source; and the public API cannot be shadowed."""

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("cometjax", "calib")

# Layer of each package prefix (longest prefix wins); an import may only point to the same or a lower layer.
LAYERS = {
    "cometjax": 0, "cometjax.errors": 0, "cometjax.data": 0,
    "cometjax.core": 1,
    "cometjax.pallas": 2,
    "cometjax.ops": 3,
    "cometjax.models": 4,
    "cometjax.quant": 5, "cometjax.diffusion": 5, "cometjax.serving": 5,
    "cometjax.checkpoint": 6,
    "calib": 7,
    "cometjax.cli": 8,
}
SIBLINGS_MAY_NOT_MEET = ("cometjax.quant", "cometjax.diffusion", "cometjax.serving")


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
  """module -> the project modules it imports (module level and inside functions alike)."""
  modules = source_modules()
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text())):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                   for alias in node.names]
      graph[name].update(t for t in targets if t.split(".")[0] in PACKAGES and t in modules)
  return graph


def layer_of(module: str) -> tuple[str, int]:
  prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
  return prefix, LAYERS[prefix]


def strongly_connected_components(graph):
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      components.append(component)

  sys.setrecursionlimit(10000)
  for v in graph:
    if v not in index:
      visit(v)
  return components


def test_graph_sees_the_known_edges():  # the reader itself: a graph with no edges would pass everything
  graph = import_graph()
  assert "cometjax.core.formats" in graph["cometjax.pallas.w4ax_matmul"]
  assert "cometjax.ops.registry" in graph["cometjax.ops.dense"]
  assert "cometjax.quant.transform" in graph["calib.stats"]


def test_no_import_cycle():
  cycles = [sorted(c) for c in strongly_connected_components(import_graph()) if len(c) > 1]
  assert not cycles, f"import cycles: {cycles}"


def test_imports_run_one_way():
  bad = []
  for module, imported in import_graph().items():
    own_prefix, own_layer = layer_of(module)
    for target in imported:
      prefix, layer = layer_of(target)
      if layer > own_layer or (layer == own_layer and prefix != own_prefix and own_prefix in SIBLINGS_MAY_NOT_MEET):
        bad.append(f"{module} (layer {own_layer}) imports {target} (layer {layer})")
  assert not bad, "\n".join(sorted(bad))


def test_the_named_boundaries():
  graph = import_graph()
  for module, imported in graph.items():
    if module.startswith("cometjax.pallas"):
      assert not {t for t in imported if t.startswith(("cometjax.models", "cometjax.serving", "cometjax.quant",
                                                        "calib"))}, module
    if module.startswith("cometjax.core"):
      assert all(t.startswith(("cometjax.core", "cometjax.errors")) for t in imported), (module, imported)
    if module.startswith("cometjax") and not module.startswith("cometjax.cli"):  # the CLI may run calib's drivers
      assert not {t for t in imported if t.startswith(("calib", "bench"))}, module
  for module, path in source_modules().items():  # bench is not a package: look for the name itself
    assert "import bench" not in path.read_text() and "from bench" not in path.read_text(), module


def test_no_submodule_shadows_a_public_name():
  """`from pkg.sub import x` sets pkg.sub; a package attribute of the same name as a submodule is lost."""
  for package_dir in [p for p in (ROOT / "cometjax").rglob("__init__.py")]:
    package = module_name(package_dir)
    submodules = {p.stem for p in package_dir.parent.glob("*.py") if p.stem != "__init__"}
    submodules |= {p.name for p in package_dir.parent.iterdir() if (p / "__init__.py").exists()}
    tree = ast.parse(package_dir.read_text())
    public = set()
    for node in tree.body:
      if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        public.add(node.name)
      elif isinstance(node, ast.ImportFrom):
        public |= {alias.asname or alias.name for alias in node.names
                   if f"{node.module}.{alias.name}" != f"{package}.{alias.asname or alias.name}"}
      elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
        public |= {ast.literal_eval(k) for k in node.value.keys}
    assert not public & submodules, f"{package}: {sorted(public & submodules)} name both a submodule and an export"


API_CALLS = textwrap.dedent("""
  import sys
  import cometjax
  from cometjax.models.llama import TINY_CONFIG, init_llama
  order = sys.argv[1]
  if order == "submodules-first":  # importing the modules that define them must not shadow the names
    import cometjax.serving.generate, cometjax.serving.perplexity, cometjax.quant.transform, cometjax.checkpoint
  model = init_llama(TINY_CONFIG.replace(num_layers=1), seed=0)

  class Tok:
    bos_id, eos_id, vocab_size = 1, 2, 512
    def encode(self, text, bos=True):
      return [1] + [3 + (ord(c) % 200) for c in text]

  for _ in range(2):
    assert callable(cometjax.generate) and callable(cometjax.quantize) and callable(cometjax.perplexity)
    assert callable(cometjax.load)
    assert len(cometjax.generate(model, [[1, 5, 7]], 3, stop_at_eos=False).tokens[0]) == 3
    quantized = cometjax.quantize(model, cometjax.preset("w4a4"), progress=False)
    assert cometjax.perplexity(quantized, Tok(), "a tiny text", window=8, progress=False).ppl > 1
    try:
      cometjax.load("/nonexistent/model")
    except FileNotFoundError:
      pass
  print("ok")
""")


@pytest.mark.slow
@pytest.mark.parametrize("order", ["package-first", "submodules-first"])
def test_public_api_twice_in_one_process(order):
  result = subprocess.run([sys.executable, "-c", API_CALLS, order], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
