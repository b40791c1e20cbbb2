# -*- test-case-name: tests.test_packaging -*-
"""
Packaging: what the sdist and the wheel hold, that they install and run,
and twistd finding both plugins and the implicittls: endpoint parser
(C{poststack-relay}, C{poststack-sandbox}) in the three ways the project is
run: after C{pip install .}, after C{pip install -e .} in pip's default
editable mode, and from the source tree with C{PYTHONPATH=.}.

L{PackagingTests} build for real, offline and fast: the project is copied to a
temporary directory (builds write C{build/} and C{*.egg-info}), each install
goes into a fresh venv made with C{--without-pip} whose only addition is a
C{.pth} file naming the site-packages of the interpreter running the tests,
so Twisted, pip and setuptools are importable there without downloading
anything, and pip runs with C{--no-index --no-deps --no-build-isolation
--check-build-dependencies} (so the running interpreter must have the
build requirements of pyproject.toml: C{make venv} installs them).

L{DistributionTests} release as a maintainer would: C{python -m build}
(sdist, then the wheel from the sdist; C{--no-isolation}, so with this
interpreter's setuptools), C{twine check}, and the wheel alone installed
into a fresh venv with pip, its dependencies from the package index (or
pip's cache), where the C{poststack-relay} command must relay a message.
They build and install once for the module.

Run only these with C{pytest tests/test_packaging.py}, or C{-k PackagingTests}
or C{-k DistributionTests}.
"""

from __future__ import annotations

import atexit
import email.parser
import json
import os
import re
import shutil
import signal
import site
import smtplib
import ssl
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, TypedDict, cast

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent

# Every subprocess is bounded by this many seconds.
TIMEOUT = 300

PLUGIN_NAMES = ("poststack-relay", "poststack-sandbox")
PLUGIN_FILES = (
    "poststack_relay_endpoints.py",
    "poststack_relay_plugin.py",
    "poststack_sandbox_plugin.py",
)
# The five of the design, prometheus-client for /metrics (README says why),
# and idna (already a dependency of treq's hyperlink) for the IDNA 2008
# A-labels of internationalized addresses (docs/mime-mapping.md).
RUNTIME_REQUIREMENTS = {
    "twisted", "service-identity", "pyopenssl", "treq", "attrs", "prometheus-client", "idna",
}
TEST_REQUIREMENTS = {
    "pytest", "hypothesis", "mypy", "mypy-zope", "kubernetes-validate", "build", "twine", "aiosmtplib"
}

# Run in the interpreter under test with -P (no script/cwd directory on
# sys.path); prints where the plugins, Twisted and our package came from.
PROBE = """\
import json
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.internet.interfaces import IStreamServerEndpointStringParser
tapnames = sorted(p.tapname for p in getPlugins(IServiceMaker))
prefixes = sorted(p.prefix for p in getPlugins(IStreamServerEndpointStringParser))
import twisted
import twisted.plugins.poststack_relay_endpoints as endpoints
import twisted.plugins.poststack_relay_plugin as relay
import twisted.plugins.poststack_sandbox_plugin as sandbox
import poststack_relay
print(json.dumps({
    "tapnames": tapnames,
    "prefixes": prefixes,
    "plugin_files": [endpoints.__file__, relay.__file__, sandbox.__file__],
    "twisted": twisted.__file__,
    "package": poststack_relay.__file__,
}))
"""


class ProbeResult(TypedDict):
    """
    What L{PROBE} prints.
    """

    tapnames: list[str]
    prefixes: list[str]
    plugin_files: list[str]
    twisted: str
    package: str


def _normalize(name: str) -> str:
    """
    A distribution name in PEP 503 normal form.
    """
    return re.sub(r"[-_.]+", "-", name).lower()


def _is_within(path: str | Path, directory: Path) -> bool:
    """
    Whether C{path} (resolved) lies inside C{directory} (resolved).
    """
    return Path(path).resolve().is_relative_to(directory.resolve())


def _copy_project(destination: Path) -> Path:
    """
    Copy what a build reads (the top-level files, C{poststack_relay/} and
    C{twisted/}, and for the sdist C{etc/}, C{docs/}, C{deploy/} and
    C{tests/}) to C{destination}/project, leaving out caches, and return it.
    """
    project = destination / "project"
    project.mkdir()
    for entry in ROOT.iterdir():
        if entry.is_file() and not entry.is_symlink():
            shutil.copy2(entry, project / entry.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache", "node_modules", "_trial_temp*")
    for name in ("poststack_relay", "twisted", "etc", "docs", "deploy", "tests"):
        shutil.copytree(ROOT / name, project / name, ignore=ignore)
    return project


def _environment(**extra: str) -> dict[str, str]:
    """
    This process's environment without the variables that would change
    which Python code a child interpreter sees, plus C{extra}.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PYTHON") and key not in ("VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    }
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """
    Run C{args} to completion (at most L{TIMEOUT} seconds), capturing output.
    """
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _dependency_directories() -> list[str]:
    """
    The import path of the interpreter running the tests, less this
    project's own tree: a scratch venv that lists these directories in a
    C{.pth} file can import Twisted, pip and setuptools from there.  Only
    the directories are added, so the C{.pth} files inside them (such as an
    editable install of this project) are not processed there.
    """
    candidates = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    candidates += site.getsitepackages() + sys.path
    found: list[str] = []
    for candidate in candidates:
        if not candidate or not os.path.isdir(candidate) or candidate in found:
            continue
        path = Path(candidate).resolve()
        if _is_within(path, ROOT) and "site-packages" not in path.parts:
            continue  # the source tree (PYTHONPATH=., an editable install), not a dependency
        found.append(candidate)
    return found


class PackagingTests(SynchronousTestCase):
    """
    Build and install the project for real, then ask twistd for its plugins.
    """

    def setUp(self) -> None:
        try:
            import pip  # noqa: F401
        except ImportError:
            raise SkipTest(f"pip is not installed for {sys.executable}")
        try:
            import venv  # noqa: F401
        except ImportError:
            raise SkipTest("the venv module is not available in this Python")
        self.scratch = Path(tempfile.mkdtemp(prefix="poststack-packaging-"))
        self.addCleanup(shutil.rmtree, self.scratch, True)
        self.project = _copy_project(self.scratch)
        # A directory with nothing in it, to run installed code from.
        self.elsewhere = self.scratch / "elsewhere"
        self.elsewhere.mkdir()

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> str:
        """
        Fail with the whole output unless C{result} exited 0; return stdout.
        """
        self.assertEqual(
            result.returncode,
            0,
            f"{what} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}",
        )
        return result.stdout

    def _make_venv(self) -> tuple[Path, Path]:
        """
        Create a scratch venv that borrows this interpreter's installed
        packages; return its python and its site-packages directory.
        """
        venv = self.scratch / "venv"
        self._check(
            _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], self.scratch, _environment()),
            "python -m venv",
        )
        python = venv / "bin" / "python"
        purelib = self._check(
            _run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                self.scratch,
                _environment(),
            ),
            "sysconfig in the scratch venv",
        ).strip()
        site_packages = Path(purelib)
        (site_packages / "_poststack_test_dependencies.pth").write_text(
            "".join(f"{directory}\n" for directory in _dependency_directories())
        )
        return python, site_packages

    def _pip(self, python: Path, *args: str) -> str:
        """
        Run pip, offline, in the interpreter C{python}.
        """
        command = [
            str(python), "-m", "pip", *args,
            "--no-index", "--no-cache-dir", "--no-deps",
            "--no-build-isolation", "--check-build-dependencies",
        ]
        return self._check(_run(command, self.scratch, _environment()), " ".join(command[1:]))

    def _twistd_help(self, python: Path, cwd: Path, env: dict[str, str]) -> str:
        """
        The output of C{twistd --help} run by C{python}: the twistd script
        of the interpreter running the tests, run by C{python} (its shebang
        line is ignored that way), or the same entry point if there is no
        such script.
        """
        script = Path(sys.executable).with_name("twistd")
        if script.is_file():
            command = [str(python), str(script), "--help"]
        else:
            command = [str(python), "-P", "-c", "import sys; from twisted.scripts.twistd import run; "
                       "sys.argv[0] = 'twistd'; sys.exit(run())", "--help"]
        return self._check(_run(command, cwd, env), "twistd --help")

    def _probe(self, python: Path, cwd: Path, env: dict[str, str]) -> ProbeResult:
        """
        Run L{PROBE} in C{python}; return what it found.
        """
        output = self._check(_run([str(python), "-P", "-c", PROBE], cwd, env), "plugin probe")
        return cast(ProbeResult, json.loads(output))

    def _assert_plugins(
        self, python: Path, cwd: Path, env: dict[str, str], plugin_dir: Path, package_dir: Path
    ) -> None:
        """
        twistd lists both plugins, and they, and our package, are loaded
        from C{plugin_dir} and C{package_dir}, while Twisted itself is the
        real one (not shadowed by our C{twisted/} directory).
        """
        help_text = self._twistd_help(python, cwd, env)
        for name in PLUGIN_NAMES:
            self.assertRegex(help_text, rf"(?m)^\s+{re.escape(name)}\s", f"{name} not in twistd --help:\n{help_text}")
        found = self._probe(python, cwd, env)
        self.assertTrue(set(PLUGIN_NAMES) <= set(found["tapnames"]), found)
        self.assertIn("implicittls", found["prefixes"])
        self.assertEqual(sorted(Path(f).name for f in found["plugin_files"]), sorted(PLUGIN_FILES))
        for plugin_file in found["plugin_files"]:
            self.assertTrue(_is_within(plugin_file, plugin_dir), f"{plugin_file} is not in {plugin_dir}")
        self.assertTrue(_is_within(found["package"], package_dir), found)
        twisted_init = Path(found["twisted"])
        self.assertTrue((twisted_init.parent / "plugins" / "__init__.py").is_file(), found)
        self.assertFalse(_is_within(twisted_init, self.project), found)

    def test_pip_install(self) -> None:
        """After `pip install .` into a fresh venv, twistd lists both plugins, loaded from that venv."""
        python, site_packages = self._make_venv()
        self._pip(python, "install", str(self.project))
        self._assert_plugins(
            python, self.elsewhere, _environment(),
            plugin_dir=site_packages / "twisted" / "plugins",
            package_dir=site_packages / "poststack_relay",
        )
        self.assertFalse((site_packages / "twisted" / "__init__.py").exists())
        self.assertFalse((site_packages / "twisted" / "plugins" / "__init__.py").exists())

    def test_pip_install_editable(self) -> None:
        """After `pip install -e .` in pip's default mode, twistd lists both plugins, loaded from the source tree."""
        python, site_packages = self._make_venv()
        self._pip(python, "install", "-e", str(self.project))
        self._assert_plugins(
            python, self.elsewhere, _environment(),
            plugin_dir=self.project / "twisted" / "plugins",
            package_dir=self.project / "poststack_relay",
        )
        # Nothing was copied into the venv: the source tree is used in place.
        self.assertFalse((site_packages / "twisted").exists())
        self.assertFalse((site_packages / "poststack_relay").exists())

    def test_source_tree(self) -> None:
        """From the source tree, PYTHONPATH=. and the dev venv's twistd list both plugins from the tree."""
        self._assert_plugins(
            Path(sys.executable), self.project, _environment(PYTHONPATH="."),
            plugin_dir=self.project / "twisted" / "plugins",
            package_dir=self.project / "poststack_relay",
        )

    def _build_wheel(self) -> zipfile.ZipFile:
        """
        Build the wheel from a tree that holds a twistd plugin cache, as a
        developer's tree does after C{make run}; return it, open.
        """
        cache = self.project / "twisted" / "plugins" / "dropin.cache"
        cache.write_bytes(b"a twistd plugin cache that must not be shipped")
        out = self.scratch / "dist"
        self._pip(Path(sys.executable), "wheel", "--wheel-dir", str(out), str(self.project))
        wheels = list(out.glob("poststack_relay-*.whl"))
        self.assertEqual(len(wheels), 1, wheels)
        wheel = zipfile.ZipFile(wheels[0])
        self.addCleanup(wheel.close)
        return wheel

    def test_wheel_contents(self) -> None:
        """The wheel ships the three plugin modules and every package file, but no twisted/__init__.py and no dropin.cache."""
        names = set(self._build_wheel().namelist())
        for plugin in PLUGIN_FILES:
            self.assertIn(f"twisted/plugins/{plugin}", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertEqual([n for n in names if n.endswith("dropin.cache")], [])
        self.assertEqual(sorted(n for n in names if n.startswith("twisted/")),
                         sorted(f"twisted/plugins/{p}" for p in PLUGIN_FILES))
        sources = {
            path.relative_to(self.project).as_posix()
            for path in (self.project / "poststack_relay").rglob("*")
            if path.is_file() and (path.suffix == ".py" or path.name == "py.typed")
        }
        self.assertIn("poststack_relay/py.typed", sources)
        self.assertEqual(sources - names, set(), "source files missing from the wheel")
        top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        self.assertEqual(top_level, {"poststack_relay", "twisted"})

    def test_wheel_requirements(self) -> None:
        """The wheel requires exactly the six runtime dependencies; the redis extra txredisapi; the test extra only test tools."""
        wheel = self._build_wheel()
        (metadata_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.HeaderParser().parsestr(wheel.read(metadata_name).decode("utf-8"))
        runtime: set[str] = set()
        extras: dict[str, set[str]] = {}
        for requirement in metadata.get_all("Requires-Dist") or []:
            spec, _, marker = requirement.partition(";")
            name = _normalize(re.split(r"[\s\[<>=!~(]", spec.strip(), maxsplit=1)[0])
            extra: Optional[str] = None
            if marker:
                match = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", marker)
                self.assertIsNotNone(match, f"unexpected marker in {requirement!r}")
                assert match is not None
                extra = match.group(1)
            if extra is None:
                runtime.add(name)
            else:
                extras.setdefault(extra, set()).add(name)
        self.assertEqual(runtime, RUNTIME_REQUIREMENTS)
        self.assertEqual(set(extras), {"redis", "test"})
        self.assertEqual(extras["redis"], {"txredisapi"})
        self.assertTrue(extras["test"] <= TEST_REQUIREMENTS, extras)


# What `python -m build` made and the venv its wheel went into, shared by the
# tests below (built by the first that needs them, removed at exit).
_SHARED: dict[str, Path] = {}


def _shared_directory() -> Path:
    """
    One scratch directory for the module's builds, removed when the test
    process exits.
    """
    if "directory" not in _SHARED:
        directory = Path(tempfile.mkdtemp(prefix="poststack-dist-"))
        atexit.register(shutil.rmtree, directory, True)
        _SHARED["directory"] = directory
    return _SHARED["directory"]


class DistributionTests(SynchronousTestCase):
    """
    C{python -m build} as a release does (the sdist, then the wheel built
    from the sdist), C{twine check}, and the wheel alone installed with its
    dependencies into a fresh venv: the C{poststack-relay} command there
    relays a message over real TLS and stops on SIGTERM with status 0, and
    twistd finds the plugins there.  The dependencies come from the
    package index as C{pip install} gets them (or pip's cache).
    """

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> str:
        """
        Fail with the whole output unless C{result} exited 0; return stdout.
        """
        self.assertEqual(
            result.returncode,
            0,
            f"{what} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}",
        )
        return result.stdout

    def built(self) -> tuple[Path, Path]:
        """
        The sdist and the wheel C{python -m build --no-isolation} makes of
        a copy of the tree that holds a twistd plugin cache (as a
        developer's does after C{make run}); built once for the module.
        """
        if "wheel" not in _SHARED:
            try:
                import build  # noqa: F401
            except ImportError:
                raise SkipTest(f"build is not installed for {sys.executable} (the test extra)")
            shared = _shared_directory()
            build_dir = Path(tempfile.mkdtemp(dir=shared))
            project = _copy_project(build_dir)
            (project / "twisted" / "plugins" / "dropin.cache").write_bytes(b"a cache that must not be shipped")
            out = shared / "dist"
            self._check(
                _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(project)],
                     build_dir, _environment()),
                "python -m build",
            )
            (sdist,) = out.glob("poststack_relay-*.tar.gz")
            (wheel,) = out.glob("poststack_relay-*.whl")
            _SHARED["sdist"], _SHARED["wheel"] = sdist, wheel
        return _SHARED["sdist"], _SHARED["wheel"]

    def installed(self) -> Path:
        """
        A fresh venv (with pip) into which C{pip install} put the wheel and
        its dependencies; made once for the module.  Returns its C{bin}.
        """
        if "bin" not in _SHARED:
            _, wheel = self.built()
            venv = Path(tempfile.mkdtemp(dir=_shared_directory())) / "venv"
            self._check(_run([sys.executable, "-m", "venv", str(venv)], venv.parent, _environment()),
                        "python -m venv")
            self._check(
                _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
                     venv.parent, _environment()),
                "pip install (the wheel)",
            )
            _SHARED["bin"] = venv / "bin"
        return _SHARED["bin"]

    def test_twine_check(self) -> None:
        """twine check --strict accepts the sdist and the wheel (the README renders as their description)."""
        sdist, wheel = self.built()
        output = self._check(
            _run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
                 sdist.parent, _environment(NO_COLOR="1")),
            "twine check",
        )
        self.assertEqual(output.count("PASSED"), 2, output)

    def test_sdist_contents(self) -> None:
        """The sdist holds the build files, every tracked source of the package, etc/, docs/, deploy/ and tests/, and no cache."""
        sdist, _ = self.built()
        with tarfile.open(sdist) as archive:
            names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        for required in ("setup.cfg", "pyproject.toml", "README.md", "PKG-INFO", "MANIFEST.in",
                         "poststack_relay/command.py", "poststack_relay/py.typed",
                         "etc/poststack-relay.service", "docs/deployment.md", "Makefile", "Containerfile",
                         "tests/common/processes.py", "tests/test_command.py"):
            self.assertIn(required, names)
        for plugin in PLUGIN_FILES:
            self.assertIn(f"twisted/plugins/{plugin}", names)
        sources = {
            path.relative_to(ROOT).as_posix()
            for directory in ("poststack_relay", "etc", "deploy", "tests")
            for path in (ROOT / directory).rglob("*")
            if path.is_file() and "node_modules" not in path.parts and "__pycache__" not in path.parts
            and not path.name.endswith((".pyc", "dropin.cache"))
        }
        self.assertEqual(sources - names, set(), "sources missing from the sdist")
        self.assertEqual([n for n in names if n.endswith(("dropin.cache", ".pyc")) or "node_modules" in n], [])

    def test_wheel_from_sdist(self) -> None:
        """The released wheel (built from the sdist) has the plugins, no cache, and the console command."""
        _, wheel = self.built()
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
            scripts = archive.read(entry_points).decode("utf-8")
        self.assertEqual(sorted(n for n in names if n.startswith("twisted/")),
                         sorted(f"twisted/plugins/{p}" for p in PLUGIN_FILES))
        self.assertIn("poststack_relay/command.py", names)
        self.assertRegex(scripts, r"(?m)^\[console_scripts\]\npoststack-relay = poststack_relay\.command:main$")

    def test_installed_wheel(self) -> None:
        """
        The wheel alone, installed with its dependencies into a fresh venv:
        poststack-relay --version and --help; the command started with
        make run's settings greets with 220 over TLS, relays a message to
        the sandbox and exits 0 on SIGTERM, without writing a plugin cache;
        twistd there lists both plugins, loaded from that venv.
        """
        from poststack_relay import __version__
        from poststack_relay.testing import write_certificate
        from tests.common.processes import free_port, wait_for_port
        from tests.common.running import read_banner, relay_environment, start_program, start_sandbox

        bin_dir = self.installed()
        python, command = bin_dir / "python", str(bin_dir / "poststack-relay")
        elsewhere = Path(tempfile.mkdtemp(dir=_shared_directory()))
        env = _environment()
        version = self._check(_run([command, "--version"], elsewhere, env), "poststack-relay --version")
        self.assertTrue(version.startswith(f"poststack-relay {__version__} (Twisted "), version)
        usage_text = self._check(_run([command, "--help"], elsewhere, env), "poststack-relay --help")
        self.assertEqual(usage_text.splitlines()[0], "Usage: poststack-relay [options]")
        self.assertIn("--tls-cert=", usage_text)

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = write_certificate(directory)
        api_url = start_sandbox(self, directory)
        port = free_port()
        relay = start_program(self, str(elsewhere), "relay", [command],
                              relay_environment(env, port, cert, key, api_url))
        wait_for_port(port, relay.process)
        banner = read_banner(port, cert)
        self.assertTrue(banner.startswith(b"220 localhost "), banner)
        context = ssl.create_default_context(cafile=cert)
        with smtplib.SMTP_SSL("localhost", port, context=context, timeout=30) as client:
            client.login("poststack", "sk_test_full_access")
            client.mail("you@yourdomain.com")
            client.rcpt("user@example.com")
            code, text = client.data(b"From: you@yourdomain.com\r\nTo: user@example.com\r\nSubject: wheel\r\n\r\nhi\r\n")
        self.assertEqual(code, 250, text)
        relay.process.send_signal(signal.SIGTERM)
        self.assertEqual(relay.process.wait(timeout=60), 0, relay.output())
        self.assertIn("Main loop terminated.", relay.output())

        purelib = Path(self._check(
            _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], elsewhere, env),
            "sysconfig",
        ).strip())
        self.assertFalse((purelib / "twisted" / "plugins" / "dropin.cache").exists(),
                         "the command scanned for plugins")
        listing = self._check(_run([str(bin_dir / "twistd"), "--help"], elsewhere, env), "twistd --help")
        for name in PLUGIN_NAMES:
            self.assertRegex(listing, rf"(?m)^\s+{re.escape(name)}\s")
        probe = cast(ProbeResult, json.loads(self._check(_run([str(python), "-P", "-c", PROBE], elsewhere, env),
                                                          "plugin probe")))
        for loaded in [*probe["plugin_files"], probe["package"]]:
            self.assertTrue(_is_within(loaded, purelib), f"{loaded} is not in {purelib}")
