"""``loraforge webui``: train, watch, compare, chat and export from the browser. Each tab is a thin layer
over the library (``train.runs``, ``train.memory``, ``serve.engine``, ``export``); runs are ``loraforge
train`` processes that outlive the page and the server."""
