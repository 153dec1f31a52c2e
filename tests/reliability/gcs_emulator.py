"""`gcp-storage-emulator`, with the one header that tensorstore needs and it leaves out.

The real GCS JSON API answers a media download (`alt=media`) with the object's generation in
an `x-goog-generation` header; tensorstore's gcs driver (which Orbax writes checkpoint arrays
through) reads it and fails with "Malformed StorageGeneration" without it, the first time an
OCDBT manifest is read back. This wrapper adds the header (and `x-goog-metageneration`) to the
emulator's download handler, then starts the emulator as its own command line would:

    python gcs_emulator.py start --host 127.0.0.1 --port PORT --default-bucket B --in-memory
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 - not found: the emulator's own handler answers 404
        obj = None
    if obj is not None:
        response["x-goog-generation"] = str(obj.get("generation", "1"))
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return _download(request, response, storage, *args, **kwargs)


objects.download = download  # before the server module builds its routing table from it

if __name__ == "__main__":
    from gcp_storage_emulator.__main__ import main

    sys.exit(main())
