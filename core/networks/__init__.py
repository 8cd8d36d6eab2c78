"""Networks: the plugin interface, pinned namespaces, attachments and their records."""
