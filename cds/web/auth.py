"""Sign-in, roles and access by need.

Passwords: scrypt (cryptography) with a per-user salt. Sessions: Flask's signed cookie (HttpOnly,
SameSite=Lax, Secure behind https) holding the user id, sign-in time and last activity; an idle
session ends after ``IDLE_MINUTES``. Clinicians see the patients of their wards; anyone else needs
break-glass with a reason, which is audited and reported to compliance. Every denial is a 403.
"""

from __future__ import annotations

import base64
import functools
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, TypeVar

import psycopg
from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from flask import Blueprint, Flask, g, redirect, render_template, request, session, url_for

from cds.errors import ForbiddenError, InputError

ROLES = ("psychiatrist", "nurse", "supervisor", "compliance", "admin")
CLINICAL_ROLES = ("psychiatrist", "nurse", "supervisor")
IDLE_MINUTES = 15
MAX_FAILED_LOGINS = 5
LOCKOUT_MINUTES = 15
BREAK_GLASS_MINUTES = 60
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}

bp = Blueprint("auth", __name__, url_prefix="/auth")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class User:
    id: int
    username: str
    display: str
    role: str
    wards: tuple[str, ...]
    practitioner_ref: str | None = None

    @property
    def actor(self) -> str:
        return self.username

    def sees_all_wards(self) -> bool:
        return "*" in self.wards


# -- passwords ------------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    key = Scrypt(salt=salt, length=32, **_SCRYPT).derive(password.encode())
    return "scrypt$%d$%d$%d$%s$%s" % (_SCRYPT["n"], _SCRYPT["r"], _SCRYPT["p"],
                                       base64.b64encode(salt).decode(), base64.b64encode(key).decode())


def check_password(stored: str | None, password: str) -> bool:
    if not stored or not stored.startswith("scrypt$"):
        Scrypt(salt=b"0" * 16, length=32, **_SCRYPT).derive(password.encode())  # same cost either way
        return False
    _, n, r, p, salt, key = stored.split("$")
    try:
        Scrypt(salt=base64.b64decode(salt), length=32, n=int(n), r=int(r), p=int(p)).verify(
            password.encode(), base64.b64decode(key))
    except InvalidKey:
        return False
    return True


# -- accounts -------------------------------------------------------------------------------------

_USER_COLUMNS = "id, username, display, role, wards, practitioner_ref"


def _user(row: Any) -> User:
    return User(int(row[0]), str(row[1]), str(row[2]), str(row[3]), tuple(row[4] or ()), row[5])


def create_user(conn: psycopg.Connection[Any], *, username: str, display: str, role: str, password: str | None,
                wards: tuple[str, ...] = (), practitioner_ref: str | None = None) -> User:
    if role not in ROLES:
        raise InputError(f"role must be one of {', '.join(ROLES)}")
    if password is not None and len(password) < 12:
        raise InputError("passwords must be at least 12 characters")
    row = conn.execute(
        f"INSERT INTO users (username, display, role, wards, password_hash, practitioner_ref)"
        f" VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (username) DO UPDATE SET display = EXCLUDED.display,"
        f" role = EXCLUDED.role, wards = EXCLUDED.wards, password_hash = EXCLUDED.password_hash,"
        f" practitioner_ref = EXCLUDED.practitioner_ref RETURNING {_USER_COLUMNS}",
        (username, display, role, list(wards), hash_password(password) if password else None,
         practitioner_ref)).fetchone()
    return _user(row)


def authenticate(conn: psycopg.Connection[Any], username: str, password: str, now: datetime) -> User | None:
    """The user, or None. Failures count; after MAX_FAILED_LOGINS the account locks for a while."""
    row = conn.execute(f"SELECT {_USER_COLUMNS}, password_hash, failed_logins, locked_until, disabled"
                       " FROM users WHERE username = %s FOR UPDATE", (username,)).fetchone()
    if row is None:
        check_password(None, password)
        return None
    if row[9] or (row[8] is not None and row[8] > now):
        check_password(None, password)
        return None
    if not check_password(row[6], password):
        failed = int(row[7]) + 1
        locked = now + timedelta(minutes=LOCKOUT_MINUTES) if failed >= MAX_FAILED_LOGINS else None
        conn.execute("UPDATE users SET failed_logins = %s, locked_until = %s WHERE id = %s",
                     (0 if locked else failed, locked, row[0]))
        return None
    conn.execute("UPDATE users SET failed_logins = 0, locked_until = NULL WHERE id = %s", (row[0],))
    return _user(row)


def get_user(conn: psycopg.Connection[Any], user_id: int) -> User | None:
    row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE id = %s AND NOT disabled", (user_id,)).fetchone()
    return _user(row) if row else None


def is_locked(conn: psycopg.Connection[Any], username: str, now: datetime) -> bool:
    row = conn.execute("SELECT locked_until FROM users WHERE username = %s", (username,)).fetchone()
    return bool(row and row[0] and row[0] > now)


# -- access by need --------------------------------------------------------------------------------


def patient_ward(conn: psycopg.Connection[Any], patient_ref: str) -> str | None:
    row = conn.execute("SELECT ward FROM patients WHERE patient_ref = %s", (patient_ref,)).fetchone()
    return row[0] if row else None


def has_break_glass(conn: psycopg.Connection[Any], user: User, patient_ref: str, now: datetime) -> bool:
    row = conn.execute("SELECT 1 FROM break_glass WHERE user_id = %s AND patient_ref = %s AND expires_at > %s"
                       " LIMIT 1", (user.id, patient_ref, now)).fetchone()
    return row is not None


def can_see_patient(conn: psycopg.Connection[Any], user: User, patient_ref: str, now: datetime) -> bool:
    """Clinicians: patients of their wards. Compliance and admin: never transcripts without break-glass."""
    if user.role in CLINICAL_ROLES:
        ward = patient_ward(conn, patient_ref)
        if user.sees_all_wards() or (ward is not None and ward in user.wards):
            return True
    return has_break_glass(conn, user, patient_ref, now)


def require_patient_access(conn: psycopg.Connection[Any], user: User, patient_ref: str, purpose: str) -> None:
    """Allow and audit, or audit the denial and raise 403."""
    from compliance import audit

    now = datetime.now(timezone.utc)
    if can_see_patient(conn, user, patient_ref, now):
        return
    audit.record(conn, event_type="access.denied", action="R", actor=user.actor, role=user.role,
                 patient_ref=patient_ref, purpose=purpose, outcome=4, detail={"path": request.path})
    conn.commit()
    raise ForbiddenError("you do not care for this patient; use break-glass with a reason if you must")


def grant_break_glass(conn: psycopg.Connection[Any], user: User, patient_ref: str, reason: str) -> None:
    from compliance import audit

    if len(reason.strip()) < 10:
        raise InputError("break-glass needs a reason of at least 10 characters")
    now = datetime.now(timezone.utc)
    conn.execute("INSERT INTO break_glass (user_id, patient_ref, reason, expires_at) VALUES (%s, %s, %s, %s)",
                 (user.id, patient_ref, reason.strip()[:500], now + timedelta(minutes=BREAK_GLASS_MINUTES)))
    audit.record(conn, event_type="break-glass", action="E", actor=user.actor, role=user.role,
                 patient_ref=patient_ref, purpose="ETREAT", outcome=0,
                 detail={"minutes": BREAK_GLASS_MINUTES, "reason_chars": len(reason.strip())})


# -- the session ------------------------------------------------------------------------------------


def current_user() -> User | None:
    return getattr(g, "user", None)


def login_required(*roles: str) -> Callable[[F], F]:
    """Pages: redirect to sign-in when nobody is signed in; 403 (audited) for the wrong role."""

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            user = current_user()
            if user is None:
                return redirect(url_for("auth.login", next=request.full_path))
            if roles and user.role not in roles:
                from compliance import audit
                from cds.web import service

                with service().pool.connection() as conn:
                    audit.record(conn, event_type="access.denied", action="R", actor=user.actor, role=user.role,
                                 outcome=4, detail={"path": request.path, "needs": list(roles)})
                    conn.commit()
                raise ForbiddenError(f"this page is for {', '.join(roles)}")
            return view(*args, **kwargs)
        return wrapped  # type: ignore[return-value]
    return decorate


def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


CSRF_EXEMPT_PREFIXES = ("/api/", "/cds-services", "/fhir/", "/healthz")


def init_app(app: Flask) -> None:
    @app.before_request
    def _load_user() -> Any:
        from cds.web import service

        g.user = None
        uid = session.get("uid")
        if uid is not None:
            last = session.get("seen", 0)
            now = datetime.now(timezone.utc).timestamp()
            if now - float(last) > IDLE_MINUTES * 60:
                session.clear()
                g.session_expired = True
            else:
                with service().pool.connection() as conn:
                    g.user = get_user(conn, int(uid))
                session["seen"] = now
        if request.method == "POST" and not request.path.startswith(CSRF_EXEMPT_PREFIXES):
            sent = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token", "")
            if not hmac.compare_digest(str(session.get("csrf", "")), str(sent)) or not sent:
                raise ForbiddenError("the form expired or did not come from this site (CSRF check); reload and retry")
        return None

    app.jinja_env.globals.update(csrf_token=csrf_token, current_user=current_user)


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    from compliance import audit
    from cds.web import service

    error = None
    if request.method == "POST":
        username = request.form.get("username", "").strip()[:100]
        password = request.form.get("password", "")
        now = datetime.now(timezone.utc)
        with service().pool.connection() as conn:
            user = authenticate(conn, username, password, now)
            if user is None:
                locked = is_locked(conn, username, now)
                audit.record(conn, event_type="login.failed", action="E", actor=username or "(blank)", outcome=4,
                             detail={"locked": locked})
                conn.commit()
                error = "locked" if locked else "failed"
            else:
                audit.record(conn, event_type="login", action="E", actor=user.actor, role=user.role, outcome=0)
                conn.commit()
                session.clear()
                session["uid"] = user.id
                session["seen"] = now.timestamp()
                session.permanent = False
                target = request.args.get("next") or ""
                if not target.startswith("/") or target.startswith("//"):
                    target = url_for("index")
                return redirect(target)
    sso = service().settings.oidc_issuer is not None
    return render_template("login.html", error=error, expired=getattr(g, "session_expired", False),
                           sso_enabled=sso), (401 if error else 200)


@bp.post("/logout")
def logout() -> Any:
    from compliance import audit
    from cds.web import service

    user = current_user()
    if user is not None:
        with service().pool.connection() as conn:
            audit.record(conn, event_type="logout", action="E", actor=user.actor, role=user.role, outcome=0)
            conn.commit()
    session.clear()
    return redirect(url_for("auth.login"))
