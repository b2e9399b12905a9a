"""
The package checks itself: build the sdist and the wheel, check them with
twine, install the wheel in a fresh virtual environment and run what a
user runs first (both programs' --version, a man page, a completion
script, the demo once). Run by tox -e package (see tox.ini); the test
suite itself runs from a wheel in tox -e tests.
"""

import glob
import os
import subprocess
import sys
import tempfile


def step(*argv, **options):
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, timeout=600, stdin=subprocess.DEVNULL, **options)


def main(top):
    with tempfile.TemporaryDirectory(prefix="ngrokd-package-") as work:
        dist = os.path.join(work, "dist")
        step(sys.executable, "-m", "build", "--outdir", dist, top)
        built = sorted(glob.glob(os.path.join(dist, "*")))
        step(sys.executable, "-m", "twine", "check", "--strict", *built)
        (wheel,) = glob.glob(os.path.join(dist, "*.whl"))
        venv = os.path.join(work, "venv")
        step(sys.executable, "-m", "venv", venv)
        bin_dir = os.path.join(venv, "bin")
        step(os.path.join(bin_dir, "python"), "-m", "pip", "install", "--quiet", wheel)
        step(os.path.join(bin_dir, "ngrokd"), "--version")
        step(os.path.join(bin_dir, "ngrokctl"), "--version")
        for page in ("man1/ngrokctl.1", "man8/ngrokd.8", "man5/ngrokd.yml.5"):
            path = os.path.join(venv, "share", "man", page)
            if not os.path.exists(path):
                raise SystemExit(f"{path}: not installed with the package")
        step(
            os.path.join(bin_dir, "ngrokctl"),
            "completion",
            "bash",
            stdout=subprocess.DEVNULL,
        )
        # The demo writes its state and logs in the working directory.
        step(os.path.join(bin_dir, "python"), "-m", "ngrokd.demo", "--once", cwd=work)
    print("package: built, checked, installed and run", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
