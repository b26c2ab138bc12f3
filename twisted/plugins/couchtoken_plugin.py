from twisted.application.service import ServiceMaker

couchtoken = ServiceMaker(
    "couchtoken",
    "couchtoken.ops.tap",
    "Token-guarded download links for CouchDB attachments.",
    "couchtoken",
)
