"""A paste filter standing in for keystonemiddleware's authtoken and nova's
keystonecontext: Nova 34 has no noauth2, and this plane has no keystone.

``X-Auth-Token: USER:PROJECT`` (or ``X-Project-Id``) becomes the identity
headers a validated token gives, then nova's own RequestContext.from_environ
builds the context (so the request id oslo.middleware put in the environ is
the context's, as in production). ``admin`` users get the admin role.
"""

from nova import context


def filter_factory(global_conf, **local_conf):
    def make(app):
        def token_context(environ, start_response):
            token = environ.get("HTTP_X_AUTH_TOKEN")
            if not token:
                start_response("401 Unauthorized", [("Content-Type", "text/plain")])
                return [b"X-Auth-Token required\n"]
            user_id, _, project_id = token.partition(":")
            project_id = environ.get("HTTP_X_PROJECT_ID") or project_id or user_id
            roles = ["admin", "member", "reader"] if user_id == "admin" else ["member", "reader"]
            environ.update({"HTTP_X_USER_ID": user_id, "HTTP_X_PROJECT_ID": project_id,
                            "HTTP_X_ROLES": ",".join(roles),
                            "HTTP_X_IDENTITY_STATUS": "Confirmed"})
            environ["nova.context"] = context.RequestContext.from_environ(
                environ, remote_address=environ.get("REMOTE_ADDR"))
            return app(environ, start_response)
        return token_context
    return make
