"""Ray is an optional extra: the core package and the CLI never import it."""
import subprocess
import sys


def test_the_core_package_and_the_cli_do_not_import_ray():
    code = "import sys, batchdecode, batchdecode.cli; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
