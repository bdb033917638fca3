"""gcp-storage-emulator (the GCS JSON API) with the two parts of that API it leaves out and that
TensorStore's gcs driver relies on, for the tests: `python tests/gcs_emulator.py start --port N ...`.

Real GCS sends an object's generation in the `x-goog-generation` header of a media download and
honours generation preconditions (`ifGenerationMatch`, `ifGenerationNotMatch`: 412 Precondition
Failed, 304 Not Modified); see cloud.google.com/storage/docs/json_api/v1/objects/get and
cloud.google.com/storage/docs/request-preconditions. TensorStore reads the header to version what it
caches and writes OCDBT manifests under `ifGenerationMatch`, so without them an Orbax checkpoint on
the plain emulator fails ("Malformed StorageGeneration"). This adds both around the emulator's own
handlers; everything else is the emulator's. Its HTTP server is single-threaded, so a check and the
write after it cannot interleave with another request.
"""
import sys
from http import HTTPStatus

from gcp_storage_emulator import __main__ as emulator_main
from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _current_generation(storage, bucket: str, name: str) -> int:
    """The object's generation, 0 when there is none (GCS's convention for preconditions)."""
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0


def _precondition_failed(request, response, current: int) -> bool:
    for field, fails in (("ifGenerationMatch", lambda g: current != g),
                         ("ifGenerationNotMatch", lambda g: current == g)):
        value = request.query.get(field)
        if value and fails(int(value[0])):
            not_modified = field == "ifGenerationNotMatch" and request.method == "GET"
            response.status = HTTPStatus.NOT_MODIFIED if not_modified else \
                HTTPStatus.PRECONDITION_FAILED
            return True
    return False


def _download(original):
    def download(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        current = _current_generation(storage, bucket, name)
        if current and _precondition_failed(request, response, current):
            return None
        if current:
            response["x-goog-generation"] = str(current)
            response["x-goog-metageneration"] = "1"
        return original(request, response, storage, *args, **kwargs)
    return download


def _insert(original):
    def insert(request, response, storage, *args, **kwargs):
        name = request.query.get("name")
        if name and _precondition_failed(
                request, response, _current_generation(storage, request.params["bucket_name"],
                                                       name[0])):
            return None
        return original(request, response, storage, *args, **kwargs)
    return insert


def _delete(original):
    def delete(request, response, storage, *args, **kwargs):
        current = _current_generation(storage, request.params["bucket_name"],
                                      request.params["object_id"])
        if _precondition_failed(request, response, current):
            return None
        return original(request, response, storage, *args, **kwargs)
    return delete


def patch() -> None:
    wrapped = {objects.download: _download(objects.download), objects.insert: _insert(objects.insert),
               objects.delete: _delete(objects.delete)}
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in wrapped:
                handlers[method] = wrapped[handler]
    objects.download = wrapped[objects.download]   # objects.get (alt=media) calls it by name
    objects.insert = wrapped[objects.insert]       # server.py falls back to it for bare POSTs


if __name__ == "__main__":
    patch()
    emulator_main.main(sys.argv[1:])
