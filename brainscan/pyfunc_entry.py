"""The file MLflow runs to build the registered model (models-from-code: nothing is pickled).

Logged with the model by components/register.py; at load time MLflow runs it with the model's
own copy of brainscan's modules (code_paths) first on sys.path.
"""

from mlflow.models import set_model

from brainscan.pyfunc import BrainscanPyfunc

set_model(BrainscanPyfunc())
