from django.utils.functional import SimpleLazyObject

from core import access
from core.portal import current_vault


def portal(request):
    """``can``: what the user may do in the vault the portal shows (``core.access`` actions:
    ``can.operate``, ``can.manage``, ...), computed only if a template asks. A page about an
    object of another vault passes its own ``can``."""

    def capabilities():
        vault = current_vault(request) if getattr(request, "user", None) and request.user.is_authenticated else None
        return access.capabilities(request.user, vault.pk if vault else None)

    return {"product_name": "Lifeboat", "can": SimpleLazyObject(capabilities)}
