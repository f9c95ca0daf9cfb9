"""The Kubernetes manifests of deploy/kubernetes without a cluster, for
tests/integration/kubernetes.rs (driven by nidd_testbed::kubernetes).

    manifests.py render DIR
        The resources the kustomization in DIR makes, as a JSON array, rendered the way
        kustomize does for the subset of kustomize the project's kustomizations use:
        `resources` (files, and directories holding a kustomization) and `patches` (a file or
        inline text holding either a strategic-merge patch made of maps only, or an RFC 6902
        JSON patch applied to a `target`). Anything else is refused, never ignored, so a
        kustomization this cannot render faithfully fails the test instead of passing it.
    manifests.py load FILE
        The YAML documents of FILE (such as `kubectl kustomize` output) as a JSON array.
    manifests.py validate -k VERSION [-k VERSION ...] FILE
        Validates every resource of the JSON array in FILE against the Kubernetes JSON schemas
        the PyPI package kubernetes-validate bundles, strictly (a field the schema does not
        know is an error) and for every VERSION. A kind without a schema is an error too
        (kubernetes-validate's command line only warns). Prints a JSON array of
        {"resource", "version", "error"} and exits 1 if any error is not null.

YAML is read with PyYAML (YAML 1.1), as Kubernetes reads it: `defaultMode: 0440` is octal.
Everything runs offline: the schemas are files inside the package.
"""

import argparse
import json
import os
import sys

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches"}
PATCH_KEYS = {"path", "patch", "target"}
TARGET_KEYS = {"group", "version", "kind", "name", "namespace"}


class RenderError(Exception):
    pass


def load_documents(text, origin):
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        raise RenderError(f"{origin}: {error}")


def inside(path, root):
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(root)]) == os.path.realpath(root)


def kustomization_file(directory):
    for name in KUSTOMIZATION_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise RenderError(f"{directory}: no kustomization file")


def render(directory, visited=()):
    root = os.path.realpath(directory)
    # kustomize refuses a base whose directory holds a kustomization already being built.
    for seen in visited:
        if seen == root or inside(seen, root):
            raise RenderError(f"{root}: cycle: it contains {seen}, which is being built")
    visited = visited + (root,)
    path = kustomization_file(root)
    with open(path) as f:
        documents = load_documents(f.read(), path)
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise RenderError(f"{path}: expected one mapping")
    kustomization = documents[0]
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    if unknown:
        raise RenderError(f"{path}: fields this renderer does not implement: {sorted(unknown)}")
    resources = []
    for entry in kustomization.get("resources") or []:
        resource_path = os.path.join(root, entry)
        if os.path.isdir(resource_path):
            resources.extend(render(resource_path, visited))
        elif os.path.isfile(resource_path):
            # kustomize's default load restriction: files only from within the root.
            if not inside(resource_path, root):
                raise RenderError(f"{path}: {entry} is a file outside {root}")
            with open(resource_path) as f:
                resources.extend(load_documents(f.read(), resource_path))
        else:
            raise RenderError(f"{path}: resource {entry} does not exist")
    seen = set()
    for resource in resources:
        key = identity(resource)
        if key in seen:
            raise RenderError(f"{path}: {key} appears twice")
        seen.add(key)
    for patch in kustomization.get("patches") or []:
        apply_patch(root, path, patch, resources)
    return resources


def identity(resource):
    metadata = resource.get("metadata") or {}
    return (resource.get("apiVersion"), resource.get("kind"), metadata.get("namespace"), metadata.get("name"))


def apply_patch(root, kustomization_path, patch, resources):
    where = f"{kustomization_path}: patch {patch!r}"
    if not isinstance(patch, dict) or set(patch) - PATCH_KEYS or ("path" in patch) == ("patch" in patch):
        raise RenderError(f"{where}: needs exactly one of path or patch, and at most a target")
    if "path" in patch:
        patch_path = os.path.join(root, patch["path"])
        if not inside(patch_path, root):
            raise RenderError(f"{where}: the file is outside {root}")
        with open(patch_path) as f:
            documents = load_documents(f.read(), patch_path)
    else:
        documents = load_documents(patch["patch"], where)
    if len(documents) != 1:
        raise RenderError(f"{where}: one patch per file, found {len(documents)} documents")
    body = documents[0]
    target = patch.get("target")
    if target is not None and (not isinstance(target, dict) or set(target) - TARGET_KEYS):
        raise RenderError(f"{where}: a target selects by {sorted(TARGET_KEYS)} only here")
    if isinstance(body, list):
        if target is None:
            raise RenderError(f"{where}: a JSON patch needs a target")
        matches = [r for r in resources if selected(r, target)]
        if not matches:
            raise RenderError(f"{where}: the target selects no resource")
        for resource in matches:
            for operation in body:
                json_patch(resource, operation, where)
    elif isinstance(body, dict):
        if target is None:
            metadata = body.get("metadata") or {}
            target = {"kind": body.get("kind"), "name": metadata.get("name")}
            group, _, version = (body.get("apiVersion") or "").rpartition("/")
            target.update({"group": group, "version": version})
        matches = [r for r in resources if selected(r, target)]
        if not matches:
            raise RenderError(f"{where}: the patch names no resource")
        for resource in matches:
            merge(resource, body, where)
    else:
        raise RenderError(f"{where}: a patch is a mapping or a list of operations")


def selected(resource, target):
    group, _, version = (resource.get("apiVersion") or "").rpartition("/")
    actual = {
        "group": group,
        "version": version,
        "kind": resource.get("kind"),
        "name": (resource.get("metadata") or {}).get("name"),
        "namespace": (resource.get("metadata") or {}).get("namespace"),
    }
    return all(actual[key] == value for key, value in target.items())


def merge(resource, patch, where, path=""):
    """A strategic-merge patch made of maps: maps merge key by key, null deletes a key, any
    other value replaces. Lists (whose merge depends on each field's merge key) and $-directives
    are refused."""
    for key, value in patch.items():
        here = f"{path}/{key}"
        if key.startswith("$"):
            raise RenderError(f"{where}: directive {here} is not implemented here")
        if value is None:
            resource.pop(key, None)
        elif isinstance(value, dict):
            current = resource.get(key)
            if not isinstance(current, dict):
                current = resource[key] = {}
            merge(current, value, where, here)
        elif isinstance(value, list):
            raise RenderError(f"{where}: list {here} in a strategic-merge patch: use a JSON patch")
        else:
            resource[key] = value


def pointer(path, where):
    if path == "":
        raise RenderError(f"{where}: operations on the whole document are not implemented here")
    if not path.startswith("/"):
        raise RenderError(f"{where}: {path!r} is not a JSON pointer")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def index(container, token, where, path, for_add=False):
    if token == "-" and for_add:
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise RenderError(f"{where}: {path}: {token!r} is not an array index")
    position = int(token)
    if position > len(container) or (position == len(container) and not for_add):
        raise RenderError(f"{where}: {path}: index {position} is out of range")
    return position


def same(a, b):
    """JSON equality: true is not 1."""
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                       and not isinstance(a, bool) and not isinstance(b, bool)):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def json_patch(document, operation, where):
    if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
        raise RenderError(f"{where}: {operation!r} is not a JSON patch operation")
    op, path = operation["op"], operation["path"]
    if op not in ("add", "remove", "replace", "test"):
        raise RenderError(f"{where}: operation {op!r} is not implemented here")
    if op != "remove" and "value" not in operation:
        raise RenderError(f"{where}: {op} {path} has no value")
    tokens = pointer(path, where)
    parent = document
    for token in tokens[:-1]:
        if isinstance(parent, dict) and token in parent:
            parent = parent[token]
        elif isinstance(parent, list):
            parent = parent[index(parent, token, where, path)]
        else:
            raise RenderError(f"{where}: {op} {path}: {token!r} does not exist")
    last = tokens[-1]
    if isinstance(parent, list):
        position = index(parent, last, where, path, for_add=(op == "add"))
        if op == "add":
            parent.insert(position, operation["value"])
        elif op == "remove":
            del parent[position]
        elif op == "replace":
            parent[position] = operation["value"]
        elif not same(parent[position], operation["value"]):
            raise RenderError(f"{where}: test {path} failed: {parent[position]!r}")
    elif isinstance(parent, dict):
        if op != "add" and last not in parent:
            raise RenderError(f"{where}: {op} {path}: it does not exist")
        if op in ("add", "replace"):
            parent[last] = operation["value"]
        elif op == "remove":
            del parent[last]
        elif not same(parent[last], operation["value"]):
            raise RenderError(f"{where}: test {path} failed: {parent[last]!r}")
    else:
        raise RenderError(f"{where}: {op} {path}: its parent is neither a map nor a list")


def validate(resources, versions):
    # Imported here: render and load need only PyYAML.
    import kubernetes_validate.utils as kv

    results = []
    for resource in resources:
        name = f"{resource.get('kind')}/{(resource.get('metadata') or {}).get('name')}"
        for version in versions:
            error = None
            try:
                kv.validate(resource, version, strict=True)
            except kv.ValidationError as e:
                error = f"{'.'.join(str(item) for item in e.path) or '(top)'}: {e.message}"
            except (kv.SchemaNotFoundError, kv.VersionNotSupportedError, kv.InvalidSchemaError) as e:
                error = e.message
            results.append({"resource": name, "version": version, "error": error})
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("render").add_argument("directory")
    commands.add_parser("load").add_argument("file")
    check = commands.add_parser("validate")
    check.add_argument("-k", "--kubernetes-version", action="append", required=True)
    check.add_argument("file")
    args = parser.parse_args()
    try:
        if args.command == "render":
            json.dump(render(args.directory), sys.stdout)
        elif args.command == "load":
            with open(args.file) as f:
                json.dump(load_documents(f.read(), args.file), sys.stdout)
        else:
            with open(args.file) as f:
                results = validate(json.load(f), args.kubernetes_version)
            json.dump(results, sys.stdout)
            return 1 if any(r["error"] is not None for r in results) else 0
    except RenderError as error:
        print(f"manifests.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
