"""Chinese and English for every page: the user's choice sticks in a cookie."""

from __future__ import annotations

from flask import Flask, g, request

LOCALES = ("zh-CN", "en")
COOKIE = "cds_lang"

MESSAGES: dict[str, dict[str, str]] = {
    "app_name": {"en": "psych-cds", "zh-CN": "psych-cds 心理风险监护"},
    "triage_title": {"en": "Triage alert queue", "zh-CN": "分诊警报队列"},
    "patient": {"en": "Patient", "zh-CN": "患者"},
    "tier": {"en": "Risk tier", "zh-CN": "风险等级"},
    "priority": {"en": "Priority", "zh-CN": "优先级"},
    "why": {"en": "Why", "zh-CN": "原因"},
    "age": {"en": "Open for", "zh-CN": "已等待"},
    "due": {"en": "Acknowledge by", "zh-CN": "确认时限"},
    "status": {"en": "Status", "zh-CN": "状态"},
    "acknowledge": {"en": "Acknowledge", "zh-CN": "确认"},
    "no_alerts": {"en": "No open alerts.", "zh-CN": "当前没有待处理警报。"},
    "overdue": {"en": "overdue", "zh-CN": "已超时"},
    "minutes": {"en": "min", "zh-CN": "分钟"},
    "crisis_resources": {"en": "Crisis resources", "zh-CN": "危机干预资源"},
    "language": {"en": "中文", "zh-CN": "English"},
    "tier.none": {"en": "None", "zh-CN": "无"},
    "tier.low": {"en": "Low", "zh-CN": "低"},
    "tier.moderate": {"en": "Moderate", "zh-CN": "中"},
    "tier.high": {"en": "High", "zh-CN": "高"},
    "tier.imminent": {"en": "Imminent", "zh-CN": "紧急"},
    "status.open": {"en": "Open", "zh-CN": "待处理"},
    "status.acknowledged": {"en": "Acknowledged", "zh-CN": "已确认"},
    "status.in_progress": {"en": "In progress", "zh-CN": "处理中"},
    "status.escalated": {"en": "Escalated", "zh-CN": "已升级"},
    "priority.stat": {"en": "STAT", "zh-CN": "立即"},
    "priority.asap": {"en": "ASAP", "zh-CN": "尽快"},
    "priority.urgent": {"en": "Urgent", "zh-CN": "紧急"},
    "priority.routine": {"en": "Routine", "zh-CN": "常规"},
    "kind.risk": {"en": "Risk", "zh-CN": "风险"},
    "kind.discordance": {"en": "Discordance", "zh-CN": "结果不一致"},
    "kind.indeterminate": {"en": "Incomplete data", "zh-CN": "数据不完整"},
    "error": {"en": "Error", "zh-CN": "错误"},
    "back": {"en": "Back", "zh-CN": "返回"},
    "sign_in": {"en": "Sign in", "zh-CN": "登录"},
    "sign_out": {"en": "Sign out", "zh-CN": "退出"},
    "username": {"en": "User name", "zh-CN": "用户名"},
    "password": {"en": "Password", "zh-CN": "密码"},
    "login_failed": {"en": "Wrong user name or password.", "zh-CN": "用户名或密码错误。"},
    "login_locked": {"en": "Too many failed attempts: this account is locked for 15 minutes.",
                     "zh-CN": "失败次数过多：该账号已锁定 15 分钟。"},
    "session_expired": {"en": "You were signed out after 15 minutes without activity.",
                        "zh-CN": "15 分钟无操作，已自动退出。"},
    "role.psychiatrist": {"en": "Psychiatrist", "zh-CN": "精神科医生"},
    "role.nurse": {"en": "Nurse", "zh-CN": "护士"},
    "role.supervisor": {"en": "Supervisor", "zh-CN": "护士长/主管"},
    "role.compliance": {"en": "Compliance officer", "zh-CN": "合规专员"},
    "role.admin": {"en": "Administrator", "zh-CN": "管理员"},
}


def locale() -> str:
    return str(getattr(g, "locale", "zh-CN"))


def t(key: str) -> str:
    entry = MESSAGES.get(key)
    if entry is None:
        return key
    loc = locale()
    return entry.get(loc) or entry.get("en") or key


def init_app(app: Flask) -> None:
    default = "en" if app.config.get("CDS_LOCALE", "zh-CN").startswith("en") else "zh-CN"

    @app.before_request
    def _pick_locale() -> None:
        chosen = request.args.get("lang") or request.cookies.get(COOKIE)
        if chosen not in LOCALES:
            chosen = request.accept_languages.best_match(LOCALES) or default
        g.locale = chosen
        g.set_lang_cookie = "lang" in request.args and chosen == request.args.get("lang")

    @app.after_request
    def _remember(response):  # type: ignore[no-untyped-def]
        if getattr(g, "set_lang_cookie", False):
            response.set_cookie(COOKIE, g.locale, max_age=365 * 86400, samesite="Lax", httponly=True)
        return response

    app.jinja_env.globals.update(t=t, locale=locale)
