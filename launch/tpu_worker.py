"""Starts a `scfm-jax` subcommand on one TPU VM worker; tpu_pod.sh copies it to every worker and
runs it there.

The worker's index and the slice's worker addresses come from the GCE metadata server, as JAX's own
TPU detection reads them (`agent-worker-number`, `worker-network-endpoints`); they are passed as
explicit coordinator flags, with worker 0 as the coordinator on port $JAX_COORDINATOR_PORT (8482,
JAX's TPU default). $GCE_METADATA_IP overrides the metadata server's address, as in JAX.

  python3 tpu_worker.py SUBCOMMAND [FLAGS ...]    e.g. train --config CONFIG --workdir WORKDIR
"""
import os
import sys
import time
import urllib.request


def metadata(key: str) -> str:
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    request = urllib.request.Request(
        f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
        headers={"Metadata-Flavor": "Google"})
    for attempt in range(6):
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.read().decode()
        except OSError as error:
            if attempt == 5:
                sys.exit(f"tpu_worker.py: cannot read {key} from the metadata server {host} "
                         f"({error}); is this a TPU VM?")
            time.sleep(0.5)


def main() -> None:
    # entries are hostnames, or name:id:ip triples in the older format
    workers = [entry.split(":")[-1] for entry in metadata("worker-network-endpoints").split(",")]
    index = int(metadata("agent-worker-number"))
    port = os.environ.get("JAX_COORDINATOR_PORT", "8482")
    os.execv(sys.executable, [
        sys.executable, "-m", "scfm_jax.main", *sys.argv[1:],
        f"--coordinator-address={workers[0]}:{port}", f"--num-processes={len(workers)}",
        f"--process-id={index}"])


if __name__ == "__main__":
    main()
