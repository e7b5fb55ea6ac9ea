"""Sign-in to the portal and the admin site, with wrong passwords limited (core/throttling.py).

Wrong passwords count against the client's address and against the user name typed, each
up to the "login" limit. Once either is locked out, the sign-in page refuses every attempt
for it, the right password too, and says for how long; the portal's page answers 429 with
Retry-After. Other addresses and other user names sign in as before.
"""
from __future__ import annotations

from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import LoginView
from django.core.exceptions import ValidationError

from core.throttling import client_address, failed_attempt_record, failed_attempts_wait

SCOPE = "login"


class LimitedSignInMixin:
    """Checks the lock-out before the password, and counts a refused password afterwards.
    ``refusal`` holds the sentence (and ``retry_after`` the seconds) when locked out."""

    refusal = ""
    retry_after = 0

    def _idents(self) -> list[tuple[str, str]]:
        idents = [("user", (self.cleaned_data.get("username") or "").casefold())]
        if self.request is not None:
            idents.append(("address", client_address(self.request)))
        return idents

    def clean(self):
        idents = self._idents()
        wait = failed_attempts_wait(scope=SCOPE, idents=idents)
        if wait is not None:
            self.retry_after = wait
            self.refusal = (
                f"Too many failed sign-ins from this address or for this user name: signing in is refused "
                f"for {wait} more second{'s' if wait != 1 else ''}, even with the right password."
            )
            raise ValidationError(self.refusal, code="too_many_attempts")
        try:
            return super().clean()
        except ValidationError:
            if self.cleaned_data.get("username") and self.cleaned_data.get("password"):
                failed_attempt_record(scope=SCOPE, idents=idents)
            raise


class SignInForm(LimitedSignInMixin, AuthenticationForm):
    pass


class AdminSignInForm(LimitedSignInMixin, AdminAuthenticationForm):
    pass


class SignInView(LoginView):
    """Django's sign-in view with ``SignInForm``; a locked-out attempt is answered 429."""

    authentication_form = SignInForm

    def form_invalid(self, form):
        response = super().form_invalid(form)
        if form.retry_after:
            response.status_code = 429
            response["Retry-After"] = str(form.retry_after)
        return response
