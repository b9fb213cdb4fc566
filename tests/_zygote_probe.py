"""A rank for tests/multiprocess/test_rank_zygote.py: prints what it started with as one JSON line,
then ends as its first argument says (``ok``, ``exit3``, ``raise``, ``hang``: a child and itself
sleep until killed, the child's pid in the file named by the second argument)."""
import json
import os
import subprocess
import sys

if __name__ == "__main__":
    print(json.dumps({"rank": os.environ.get("RANK"), "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(),
                      "preloaded": "megatron.core" in sys.modules, "main_file": sys.modules["__main__"].__file__,
                      "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}), flush=True)
    how = sys.argv[1]
    if how == "exit3":
        sys.exit(3)
    if how == "raise":
        raise ValueError("the probe raised")
    if how == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(sys.argv[2] + os.environ["RANK"], "w") as fh:
            fh.write(str(child.pid))
        child.wait()
