"""A small Dockerfile reader, and the checks pdserve's images must pass without Docker.

Reads what ``docker build`` reads: instructions with ``\\`` continuations, comments and parser
directives (skipped), build arguments (global ones before the first FROM, stage ones after)
with ``$X`` / ``${X}`` / ``${X:-default}`` substitution, and stages (``FROM image AS name``).
Heredocs are not supported (pdserve's Dockerfiles use none; ``parse`` refuses them).

``check_image`` returns a list of problems (empty when the Dockerfile is fine), so a test can
assert both that the real files pass and that each rule catches a broken file.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT_USERS = {"root", "0"}


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str  # the rest, continuations joined with a space
    line: int  # 1-based line where it starts

    def exec_form(self) -> list[str] | None:
        """The JSON-array form (``CMD ["a", "b"]``), or None for the shell form."""
        if not self.value.startswith("["):
            return None
        try:
            out = json.loads(self.value)
        except json.JSONDecodeError:
            return None
        return out if isinstance(out, list) and all(isinstance(x, str) for x in out) else None


@dataclass
class Stage:
    index: int
    base: str  # the FROM image with build args substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)  # ARG values in scope at the stage's end

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, ref: str) -> Stage | None:
        """A stage by name or index, as ``COPY --from`` and ``FROM`` refer to it."""
        for s in self.stages:
            if s.name == ref or str(s.index) == ref:
                return s
        return None

    def parent(self, stage: Stage) -> Stage | None:
        """The earlier stage this one is built FROM, if any."""
        p = self.stage(stage.base)
        return p if p is not None and p.index < stage.index else None

    def effective(self, stage: Stage, keyword: str) -> Instruction | None:
        """The last ``keyword`` instruction in force in ``stage``: USER, CMD, HEALTHCHECK and
        LABEL-like settings carry over from the stage it is built FROM."""
        s: Stage | None = stage
        while s is not None:
            found = s.all(keyword)
            if found:
                return found[-1]
            s = self.parent(s)
        return None

    def labels(self, stage: Stage) -> dict[str, str]:
        chain: list[Stage] = []
        s: Stage | None = stage
        while s is not None:
            chain.append(s)
            s = self.parent(s)
        out: dict[str, str] = {}
        for s in reversed(chain):
            for ins in s.all("LABEL"):
                for word in shlex.split(ins.value):
                    k, _, v = word.partition("=")
                    out[k] = expand(v, s.args)
        return out


_VAR = re.compile(r"\$(?:\{(\w+)(?::-([^}]*))?\}|(\w+))")


def expand(text: str, env: dict[str, str]) -> str:
    """Substitute ``$X``, ``${X}`` and ``${X:-default}`` as Docker does for build args."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        value = env.get(name, "")
        if m.group(2) is not None and not value:
            return m.group(2)
        return value

    return _VAR.sub(sub, text)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue  # blank lines, comments and parser directives
        if buf and line.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker too
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        out.append((start, " ".join(x for x in buf if x)))
        buf = []
    if buf:
        raise ValueError(f"line {start}: the file ends inside a line continuation")
    return out


def parse(text: str, build_args: dict[str, str] | None = None) -> Dockerfile:
    """Parse a Dockerfile; ``build_args`` are ``--build-arg`` overrides."""
    overrides = dict(build_args or {})
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, content in _logical_lines(text):
        keyword, _, value = content.partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if "<<" in value and keyword in ("RUN", "COPY"):
            raise ValueError(f"line {line}: heredocs are not supported by this reader")
        if keyword == "ARG":
            name, eq, default = value.partition("=")
            scope = stages[-1].args if stages else global_args
            if name in overrides:
                scope[name] = overrides[name]
            elif eq:
                scope[name] = expand(default.strip().strip('"'), {**global_args, **scope})
            elif stages and name in global_args:
                scope[name] = global_args[name]  # a stage re-declares a global arg: inherits it
            else:
                scope.setdefault(name, "")
            continue
        if keyword == "FROM":
            words = [w for w in value.split() if not w.startswith("--")]
            base = expand(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(index=len(stages), base=base, name=name))
            continue
        if not stages:
            raise ValueError(f"line {line}: {keyword} before the first FROM")
        stages[-1].instructions.append(Instruction(keyword, value, line))
    if not stages:
        raise ValueError("no FROM instruction")
    return Dockerfile(global_args, stages)


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    dest: str
    flags: dict[str, str]


def parse_copy(ins: Instruction, args: dict[str, str]) -> Copy:
    form = ins.exec_form()
    words = form if form is not None else shlex.split(ins.value)
    flags: dict[str, str] = {}
    rest: list[str] = []
    for w in words:
        if w.startswith("--") and not rest:
            k, _, v = w[2:].partition("=")
            flags[k] = v
        else:
            rest.append(expand(w, args))
    if len(rest) < 2:
        raise ValueError(f"line {ins.line}: {ins.keyword} needs a source and a destination")
    return Copy(rest[:-1], rest[-1], flags)


class DockerIgnore:
    """The build-context filter: later patterns win; ``!`` re-includes; a path is excluded
    when it or one of its parent folders matches (Docker's rule)."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pat = line[1:].strip() if negate else line
            self.rules.append((negate, re.compile(_glob_to_regex(pat.strip("/")))))

    def excluded(self, path: str) -> bool:
        parts = Path(path).as_posix().strip("/").split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        out = False
        for negate, rx in self.rules:
            if any(rx.fullmatch(c) for c in candidates):
                out = not negate
        return out


def _glob_to_regex(pat: str) -> str:
    out = []
    i = 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif pat[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pat[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pat[i]))
            i += 1
    return "".join(out)


# ---- the rules pdserve's images follow ----------------------------------------------------
_RAY_IMAGE = re.compile(r"rayproject/ray:(?P<ray>[0-9.]+)-py(?P<py>3\d+)-(?P<device>cpu|cu\d+)")


def check_image(df: Dockerfile, repo: Path, ignore: DockerIgnore, ray_version: str,
                device: str, version: str) -> list[str]:
    """Problems of one of pdserve's Dockerfiles (``device``: "cpu" or "cuda").

    Rules: multi-stage; every external base is the official Ray image of ``ray_version``
    for the device, all the same; COPY --from names an earlier stage; COPY sources exist in
    the repository and survive the .dockerignore; the final stage runs as a numeric non-root
    user, has a HEALTHCHECK and an exec-form CMD, and OCI labels whose version is ``version``.
    """
    problems: list[str] = []
    if len(df.stages) < 2:
        problems.append("not multi-stage: one FROM")
    final = df.stages[-1]
    external = [s for s in df.stages if df.parent(s) is None]
    bases = {s.base for s in external}
    if len(bases) > 1:
        problems.append(f"stages start from different images: {sorted(bases)}")
    for s in external:
        m = _RAY_IMAGE.fullmatch(s.base)
        if m is None:
            problems.append(f"stage {s.name or s.index}: base {s.base!r} is not an official "
                            "rayproject/ray:<version>-py3XX-<cpu|cuXXX> image")
            continue
        if m["ray"] != ray_version:
            problems.append(f"stage {s.name or s.index}: Ray {m['ray']} in the base image, but "
                            f"pyproject.toml pins ray {ray_version}")
        want_cpu = device == "cpu"
        if (m["device"] == "cpu") != want_cpu:
            problems.append(f"stage {s.name or s.index}: base {s.base!r} is not a {device} image")
    for s in df.stages:
        for ins in s.all("COPY") + s.all("ADD"):
            cp = parse_copy(ins, s.args)
            src_stage = cp.flags.get("from")
            if src_stage is not None:
                ref = df.stage(src_stage)
                if ref is None or ref.index >= s.index:
                    problems.append(f"line {ins.line}: --from={src_stage} is not an earlier stage")
                continue
            for src in cp.sources:
                hits = [p for p in repo.glob(src)] if any(c in src for c in "*?[") \
                    else ([repo / src] if (repo / src).exists() else [])
                if not hits:
                    problems.append(f"line {ins.line}: {ins.keyword} source {src!r} does not "
                                    "exist in the repository")
                for h in hits:
                    rel = h.relative_to(repo).as_posix()
                    if ignore.excluded(rel):
                        problems.append(f"line {ins.line}: {rel!r} is excluded by the "
                                        ".dockerignore, so the build would not see it")
    if not any(cp_from(i) for st in df.stages[1:] for i in st.all("COPY")):
        problems.append("no stage copies from an earlier one: the stages are not used")
    user = df.effective(final, "USER")
    if user is None:
        problems.append("final stage: no USER (the base image's default user is in force)")
    else:
        name = expand(user.value, final.args).split(":")[0]
        if name in ROOT_USERS:
            problems.append(f"line {user.line}: final stage runs as root")
        elif not name.isdigit():
            problems.append(f"line {user.line}: USER {name!r} is not numeric, so Kubernetes' "
                            "runAsNonRoot cannot verify it")
    hc = df.effective(final, "HEALTHCHECK")
    if hc is None or hc.value.upper().startswith("NONE") or " CMD " not in f" {hc.value} ":
        problems.append("final stage: no HEALTHCHECK ... CMD")
    cmd = df.effective(final, "CMD")
    if cmd is None or cmd.exec_form() is None:
        problems.append("final stage: no exec-form CMD")
    labels = df.labels(final)
    for key in ("org.opencontainers.image.title", "org.opencontainers.image.version",
                "org.opencontainers.image.description"):
        if key not in labels:
            problems.append(f"final stage: no label {key}")
    if labels.get("org.opencontainers.image.version", version) != version:
        problems.append(f"label org.opencontainers.image.version="
                        f"{labels['org.opencontainers.image.version']!r}, pyproject says {version!r}")
    return problems


def cp_from(ins: Instruction) -> bool:
    return any(w.startswith("--from=") for w in ins.value.split())


def healthcheck_command(df: Dockerfile) -> list[str]:
    """The exec-form command of the final stage's HEALTHCHECK."""
    hc = df.effective(df.stages[-1], "HEALTHCHECK")
    if hc is None:
        raise ValueError("no HEALTHCHECK")
    _, _, cmd = hc.value.partition(" CMD ")
    out = json.loads(cmd.strip())
    assert isinstance(out, list)
    return out


def copied_to(df: Dockerfile, stage: Stage, dest_path: str) -> list[str]:
    """Repository paths that COPY instructions of ``stage`` (and its parents) put at
    ``dest_path`` in the image, following ``dest/`` folder semantics."""
    out: list[str] = []
    dest = Path(dest_path)
    s: Stage | None = stage
    while s is not None:
        for ins in s.all("COPY"):
            cp = parse_copy(ins, s.args)
            if "from" in cp.flags:
                continue
            for src in cp.sources:
                if cp.dest.endswith("/"):  # into a folder: keeps the source's file name
                    if Path(cp.dest) == dest.parent and fnmatch.fnmatch(dest.name, Path(src).name):
                        out.append((Path(src).parent / dest.name).as_posix())
                elif Path(cp.dest) == dest:
                    out.append(src)
        s = df.parent(s)
    return out
