"""The run as a graph of pure tasks, and the executors that evaluate it.

A Task is a module-level function, its plain keyword arguments, and the tasks whose values it takes as
further arguments (`deps`: argument name -> a task key, or a list of keys). Its key hashes everything that
determines its value: the stage, its identity (weights hash, layer, image hash, parameters, code version)
and its deps' keys. So the cache, both executors and the tests treat every task alike, and evaluation
pulls: a wanted task whose key is in the cache is loaded, and the tasks only it needed never run. A warm
rerun of a full-size spec loads its final results and renders.

Executors: `local` runs tasks in this process, depth first, dropping each intermediate value once its
last consumer has run (with workers, in worker processes in the same order: pipeline/workers.py, which also
picks the executor); `ray` submits the same tasks to Ray (a local one started for the run, or a cluster), with
a GPU for the tasks that run a model when the run's device is CUDA.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from report_builder.pipeline import raywatch
from report_builder.pipeline.cache import Cache, stage_key
from report_builder.errors import UserError
from report_builder.pipeline.progress import Progress

# The folder that holds the report_builder package: where a helper process started with -m finds it.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass(eq=False)
class Task:
    key: str
    stage: str  # cache folder, progress label and provenance group
    fn: Callable[..., Any] | None  # None: a value node, data the driver already holds
    args: dict[str, Any]
    deps: dict[str, str | list[str]]
    label: str  # what it does, for progress: "explain lite0 chelsea LIME"
    cache: bool = True
    model: bool = False  # runs a model: needs the run's accelerator
    shape: Any = Any  # the structure of its value, checked when it comes from the cache
    value: Any = None


@dataclass
class Graph:
    tasks: dict[str, Task] = field(default_factory=dict)

    def add(self, stage: str, fn: Callable[..., Any], label: str, identity: dict[str, Any],
            args: dict[str, Any] | None = None, deps: dict[str, str | list[str]] | None = None, *,
            cache: bool = True, model: bool = False, shape: Any = Any) -> str:
        """Add a task (once: a task of the same content is the same task) and return its key."""
        deps = deps or {}
        args = args or {}
        key = stage_key(stage, {"identity": identity, "deps": deps})
        if key not in self.tasks:
            self.tasks[key] = Task(key, stage, fn, args, deps, label, cache, model, shape)
        elif _scalars(self.tasks[key].args) != _scalars(args):
            # the identity left out something that changes the result: a bug in the graph, not a user's error
            raise AssertionError(f"tasks {self.tasks[key].label!r} and {label!r} share a key but not their arguments")
        return key

    def value(self, stage: str, label: str, identity: dict[str, Any], value: Any) -> str:
        """Data the driver holds (a probe shard, a model's input crops), shared by the tasks that depend on it."""
        key = stage_key(stage, {"identity": identity})
        self.tasks.setdefault(key, Task(key, stage, None, {}, {}, label, cache=False, value=value))
        return key

    def dep_keys(self, task: Task) -> list[str]:
        return [k for d in task.deps.values() for k in ([d] if isinstance(d, str) else d)]

    def plan(self, wanted: list[str], cache: Cache) -> list[str]:
        """The tasks to compute, dependencies first: those reachable from `wanted` without passing a cached one."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(key: str) -> None:
            if key in seen:
                return
            seen.add(key)
            t = self.tasks[key]
            if t.fn is None or (t.cache and cache.contains(t.stage, key)):
                return
            for d in self.dep_keys(t):
                visit(d)
            order.append(key)

        for key in wanted:
            visit(key)
        return order


def _scalars(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, type(None)))}


@dataclass
class Outcome:
    values: dict[str, Any]  # key -> value, for every wanted key
    computed: set[str]  # the keys computed in this run (the others came from the cache)
    seconds: dict[str, float]  # stage -> seconds spent computing its tasks


def call(task: Task, values: dict[str, Any]) -> Any:
    return task.fn(**task.args, **values)


# ---------------------------------------------------------------- progress per stage


class StageClock:
    """Per stage: tasks to do, done, computed seconds; a line when a stage starts and when it ends."""

    def __init__(self, graph: Graph, todo: list[str], progress: Progress):
        self.progress = progress
        self.todo = Counter(graph.tasks[k].stage for k in todo)
        self.done: Counter = Counter()
        self.seconds: dict[str, float] = defaultdict(float)
        self.started: set[str] = set()

    def start(self, task: Task) -> None:
        if task.stage not in self.started:
            self.started.add(task.stage)
            n = self.todo.get(task.stage, 0)
            self.progress.say(f"{task.stage}: {n} task{'s' if n != 1 else ''} ...")

    def finish(self, task: Task, seconds: float) -> None:
        self.done[task.stage] += 1
        self.seconds[task.stage] += seconds
        self.progress.say(f"  {task.label} ({seconds:.1f} s)", detail=True)
        if self.done[task.stage] >= self.todo.get(task.stage, 0):
            self.progress.say(f"{task.stage}: {self.done[task.stage]} done in {self.seconds[task.stage]:.1f} s of compute")


# ---------------------------------------------------------------- executors


class LocalExecutor:
    """Every task in this process, one after the other."""

    name = "local"
    shares = None  # worker processes and threads each (pipeline/workers.py); None: one process, every thread

    def __enter__(self) -> LocalExecutor:
        return self

    def describe(self) -> str:
        return "local (this process)"

    def __exit__(self, *exc) -> None:
        return None

    def run(self, graph: Graph, wanted: list[str], cache: Cache, progress: Progress) -> Outcome:
        """The values of `wanted`, the keys computed (not loaded from the cache), and per stage the compute seconds."""
        todo = graph.plan(wanted, cache)
        clock = StageClock(graph, todo, progress)
        readers: dict[str, list[str]] = defaultdict(list)  # key -> the planned tasks that read it
        for k in todo:
            for d in graph.dep_keys(graph.tasks[k]):
                readers[d].append(k)
        remaining = Counter({d: len(r) for d, r in readers.items()})
        keep = set(wanted)
        memo: dict[str, Any] = {}
        computed: set[str] = set()
        underway: set[str] = set()

        def get(key: str) -> Any:
            if key in memo:
                return memo[key]
            t = graph.tasks[key]
            if t.fn is None:
                return t.value
            value = cache.load(t.stage, key, t.shape) if t.cache else None
            if value is None:
                underway.add(key)
                values = {name: get(d) if isinstance(d, str) else [get(x) for x in d] for name, d in t.deps.items()}
                clock.start(t)
                bar.doing(t.label)
                start = time.perf_counter()
                with progress.active():
                    value = call(t, values)
                del values
                clock.finish(t, time.perf_counter() - start)
                computed.add(key)
                bar.update()
                for d in graph.dep_keys(t):
                    remaining[d] -= 1
                    if remaining[d] <= 0 and d not in keep:
                        memo.pop(d, None)  # its last consumer has run: let it go
                if t.cache:
                    cache.save(t.stage, key, value)
                underway.discard(key)
            memo[key] = value
            if not t.cache:
                # a value that is not stored (a shard's decoded pixels): its readers run now, one after the
                # other, so it is let go before the next one is made, instead of all being held at once
                for reader in readers[key]:
                    if reader not in underway:
                        get(reader)
            return value

        with progress.bar("tasks", len(todo)) as bar:
            out = {key: get(key) for key in wanted}
        return Outcome(out, computed, dict(clock.seconds))


@dataclass
class TaskCall:
    """What a Ray worker needs to run one task and store its value in the cache."""

    fn: Callable[..., Any]
    args: dict[str, Any]
    stage: str
    key: str
    store: bool
    cache_root: str
    cache_enabled: bool
    threads: int


def run_remote(call_: TaskCall, layout: list[tuple[str, int | None]], *values: Any) -> tuple[Any, float]:
    """The body of every Ray task: rebuild the keyword arguments from the flat values, run, store, return."""
    import torch

    torch.set_num_threads(call_.threads)
    kwargs: dict[str, Any] = {}
    i = 0
    for name, count in layout:
        if count is None:
            kwargs[name] = values[i]
            i += 1
        else:
            kwargs[name] = list(values[i : i + count])
            i += count
    start = time.perf_counter()
    value = call_.fn(**call_.args, **kwargs)
    seconds = time.perf_counter() - start
    if call_.store:
        Cache(call_.cache_root if call_.cache_root else None, enabled=call_.cache_enabled,
              warn=lambda text: None).save(call_.stage, call_.key, value)
    return value, seconds


RAY_MISSING = ("--executor ray needs Ray, which is not installed: pip install 'report_builder[ray]' "
               "(or pip install 'ray[client]'), then run again")
RAY_CONNECT_S = 5.0  # how long --ray-address has to accept a connection, and again to answer as Ray
RAY_CLIENT_PORT = 10001  # ray://host without a port: Ray Client's default
RAY_GCS_PORT = 6379  # host without a port: `ray start --head`'s default


def _bad_address(address: str) -> UserError:
    return UserError(f"--ray-address: found {address!r}, expected 'auto', host:port (a Ray head's GCS, as "
                     "`ray start --head` prints it) or ray://host:port (Ray Client)")


def _split_address(address: str, default_port: int) -> tuple[str, int]:
    """host:port (or [v6]:port, or host alone) -> (host, port)."""
    host, sep, port = address.rpartition(":") if not address.endswith("]") else (address, "", "")
    if not sep:
        host, port = address, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad_address(address)
    return host, int(port)


def _auto_address() -> str:
    """What 'auto' means on this machine: $RAY_ADDRESS, else the cluster `ray start` last recorded here, else a
    running GCS found among this machine's processes (Ray's own lookup, which ray.init would make)."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private import services

        found = services.canonicalize_bootstrap_address("auto")
    except ConnectionError:
        found = None
    except Exception:  # noqa: BLE001 - Ray's private lookup moved or failed: let ray.init look for itself
        return "auto"
    if not found:
        raise UserError("--ray-address auto: no running Ray cluster was found on this machine ($RAY_ADDRESS is "
                        "not set, and no Ray head runs here). Start one with `ray start --head`, or give the "
                        "address of one (host:port, or ray://host:port for Ray Client); without --ray-address "
                        "the run starts a local Ray of its own and stops it after")
    return found


def check_ray_address(address: str) -> str:
    """The address to give ray.init, once something that speaks Ray answers there; a UserError within about
    2 x RAY_CONNECT_S otherwise (ray.init itself retries an address with nothing behind it for many minutes)."""
    import socket

    given = address
    if address == "local":  # Ray's word for a new local Ray, as no address gives
        return address
    if address == "auto":
        address = _auto_address()
        if address == "auto":
            return address
    client = address.startswith("ray://")
    if "://" in address and not client:
        raise _bad_address(given)
    if client:
        try:
            import grpc  # noqa: F401 - Ray Client needs it, and ray[client] brings it
        except ImportError:
            raise UserError(f"--ray-address {given}: ray:// addresses need Ray Client, which is not installed: "
                            "pip install 'report_builder[ray]' (or pip install 'ray[client]')") from None
    try:
        host, port = _split_address(address[len("ray://"):] if client else address,
                                    RAY_CLIENT_PORT if client else RAY_GCS_PORT)
    except UserError:
        raise _bad_address(given) from None
    named = f"--ray-address {given}" + (f" ({address})" if given != address else "")
    what = "Ray Client server" if client else "Ray head (its GCS)"
    todo = (f"Start Ray there (`ray start --head --port={port}`" if not client else
            f"Start Ray there (`ray start --head --ray-client-server-port={port}`")
    todo += (", on that machine), or check the address; without --ray-address the run starts a local Ray of its "
             "own and stops it after")
    try:
        with socket.create_connection((host, port), timeout=RAY_CONNECT_S):
            pass
    except socket.gaierror as exc:
        raise UserError(f"{named}: no machine is called {host!r} ({exc.strerror}). Check the address") from None
    except ConnectionRefusedError:
        raise UserError(f"{named}: nothing is listening there (connection refused), so there is no {what} to "
                        f"connect to. {todo}") from None
    except (socket.timeout, TimeoutError):
        raise UserError(f"{named}: no answer within {RAY_CONNECT_S:g} s (a firewall, or no such machine on the "
                        f"network). {todo}") from None
    except OSError as exc:
        raise UserError(f"{named}: cannot connect ({exc.strerror or exc}). {todo}") from None
    try:
        import grpc
    except ImportError:  # plain Ray without Ray Client: the connection answered, let ray.init speak to it
        return address
    if os.environ.get("RAY_USE_TLS", "0") not in ("", "0"):
        return address
    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=RAY_CONNECT_S)
    except grpc.FutureTimeoutError:
        channel.close()
        raise UserError(f"{named}: something is listening there but does not answer as a {what} within "
                        f"{RAY_CONNECT_S:g} s. {todo}") from None
    # A cluster with token authentication (`ray start` turns it on when ~/.ray/auth_token exists) refuses a
    # driver that sends no token; ray.init then takes half a minute to say only that it could not connect.
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        method = "/ray.rpc.RayletDriver/ClusterInfo" if client else "/ray.rpc.NodeInfoGcsService/GetClusterId"
        call = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
        try:
            call(b"", timeout=RAY_CONNECT_S)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                channel.close()
                raise UserError(f"{named}: the Ray cluster there uses token authentication and this run sent "
                                "no token. Set RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token "
                                "(or $RAY_AUTH_TOKEN), then run again") from None
        except Exception:  # noqa: BLE001 - only a clear refusal is worth a message; ray.init says the rest
            pass
    channel.close()
    return address


class RayExecutor:
    """The same tasks on Ray: a local Ray started for the run (no address), or a cluster ('auto', ray://host:port).

    Workers read and write the cache folder when they share a file system with the driver; every value also
    comes back to the driver, which writes the run directory. A task whose worker dies is retried by Ray.

    Each task asks for as many CPUs as the driver's torch uses threads (`cpus_per_task`), and runs with that
    many threads: a model's forward pass is already parallel over a machine's cores, and the same thread
    count gives the same floating-point sums, so a Ray run's numbers equal a local run's."""

    name = "ray"
    shares = None  # each task gets as many threads as the driver has

    def __init__(self, address: str | None = None, num_cpus: int | None = None, gpu: bool = False,
                 cpus_per_task: int | None = None):
        import torch

        self.address = address
        self.num_cpus = num_cpus
        self.gpu = gpu
        self.cpus_per_task = cpus_per_task or torch.get_num_threads()
        self._ray = None
        self._started = False
        self._watchdog: subprocess.Popen | None = None

    def __enter__(self) -> RayExecutor:
        try:
            import ray
        except ImportError:
            raise UserError(RAY_MISSING) from None
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")  # errors reach the user once, through us
        self._ray = ray
        if ray.is_initialized():  # a session this process already holds (a notebook, the tests): use it as it is
            return self
        kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False, "configure_logging": True,
                                  "logging_level": "ERROR"}
        local = self.address in (None, "", "local")
        if local:
            kwargs["num_cpus"] = self.num_cpus or os.cpu_count() or 1
            self._watch()
        else:
            kwargs["address"] = check_ray_address(self.address)
            if kwargs["address"].startswith("ray://"):  # Ray Client takes none of the local-only options
                kwargs = {"address": kwargs["address"], "logging_level": "ERROR"}
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            self._unwatch()
            where = f"--ray-address {self.address}" if self.address else "--executor ray (a local Ray)"
            raise UserError(f"{where}: could not start or connect to Ray ({str(exc)[:300]})") from None
        finally:
            if local:
                os.environ.pop(raywatch.MARK_VARIABLE, None)  # Ray's processes have it; nothing else this starts
        self._started = True
        return self

    def _watch(self) -> None:
        """Start the watchdog that stops this run's Ray if the driver dies without stopping it (see raywatch),
        and mark the environment the Ray processes started next inherit."""
        mark = uuid.uuid4().hex
        env = {k: v for k, v in os.environ.items() if k != raywatch.MARK_VARIABLE}
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "report_builder.pipeline.raywatch", mark, str(os.getpid())], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
                cwd=PACKAGE_PARENT)
        except OSError:  # no watchdog: the run still works, as it did before there was one
            self._watchdog = None
            return
        os.environ[raywatch.MARK_VARIABLE] = mark

    def _unwatch(self) -> None:
        """Tell the watchdog the run is over (it sweeps what ray.shutdown left) and reap it."""
        dog, self._watchdog = self._watchdog, None
        if dog is None:
            return
        dog.stdin.close()
        try:
            dog.wait(timeout=raywatch.GRACE_S + 5)
        except subprocess.TimeoutExpired:
            pass  # it finishes on its own

    def __exit__(self, *exc) -> None:
        if self._started:
            self._ray.shutdown()
        self._unwatch()

    def describe(self) -> str:
        ray = self._ray
        resources = ray.cluster_resources()
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        where = self.address or "local"
        return (f"ray ({where}: {nodes} node{'s' if nodes != 1 else ''}, {resources.get('CPU', 0):g} CPUs, "
                f"{resources.get('GPU', 0):g} GPUs)")

    def run(self, graph: Graph, wanted: list[str], cache: Cache, progress: Progress) -> Outcome:
        ray = self._ray
        remote = ray.remote(run_remote)
        loaded: dict[str, Any] = {}  # values the driver already has: value nodes and cache hits
        refs: dict[str, Any] = {}  # key -> the ObjectRef of its value
        submitted: dict[Any, Task] = {}  # the ObjectRef of a task's seconds -> the task
        todo = graph.plan(wanted, cache)
        clock = StageClock(graph, todo, progress)

        def value_of(key: str) -> bool:
            """Whether the driver has the key's value (a value node or a cache hit); loads it if so."""
            if key in loaded:
                return True
            t = graph.tasks[key]
            value = t.value if t.fn is None else (cache.load(t.stage, key, t.shape) if t.cache else None)
            if t.fn is None or value is not None:
                loaded[key] = value
                return True
            return False

        def ref(key: str) -> Any:
            if key in refs:
                return refs[key]
            if value_of(key):
                refs[key] = ray.put(loaded[key])
                return refs[key]
            t = graph.tasks[key]
            layout, flat = [], []
            for name, d in t.deps.items():
                if isinstance(d, str):
                    layout.append((name, None))
                    flat.append(ref(d))
                else:
                    layout.append((name, len(d)))
                    flat.extend(ref(x) for x in d)
            call_ = TaskCall(t.fn, t.args, t.stage, key, t.cache and cache.writable, str(cache.root), cache.enabled,
                             self.cpus_per_task)
            options = {"num_gpus": 1 if (t.model and self.gpu) else 0, "num_cpus": self.cpus_per_task,
                       "max_retries": 3, "retry_exceptions": False, "name": t.label[:100]}
            refs[key], seconds = remote.options(num_returns=2, **options).remote(call_, layout, *flat)
            submitted[seconds] = t
            clock.start(t)
            return refs[key]

        for key in wanted:
            if not value_of(key):
                ref(key)
        for key in set(refs) - set(wanted):
            del refs[key]  # Ray frees an intermediate value (a shard's pixels) once its readers are done
        pending = list(submitted)
        try:
            with progress.bar("tasks", len(pending)) as bar:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                    for r in ready:
                        clock.finish(submitted[r], ray.get(r))
                        cache.misses += 1
                        bar.update()
            out = {key: loaded[key] if key in loaded else ray.get(refs[key]) for key in wanted}
            computed = {t.key for t in submitted.values()}
        except ray.exceptions.RayTaskError as exc:
            # The other tasks are not cancelled: ray.cancel racing a task's completion aborts the driver in Ray
            # itself ("Tried to complete task that was not pending", ray-project/ray#54846). Tasks that need the
            # failed one fail with it; the rest finish on their own and only fill the cache, and a Ray this run
            # started is shut down on the way out, which stops them.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, UserError):
                raise cause from None
            raise
        return Outcome(out, computed, dict(clock.seconds))
