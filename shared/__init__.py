"""Common code for every xiaozhi service: messages, subjects, settings, NATS, logging, metrics."""
