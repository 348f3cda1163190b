"""The ``xiaozhi`` command: run services, start the local stack, simulate a device."""
