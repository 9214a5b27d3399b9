"""The Health tab: tbhealth's TensorBoard plugin (installed as ``tbhealth_plugin``).

TensorBoard finds it through the ``tensorboard_plugins`` entry point
``tbhealth = tbhealth_plugin.plugin:HealthLoader``. Routes: ``http_api.md``. Nothing here
imports torch, so loading the plugin keeps TensorBoard's start-up light.
"""
