from twisted.application.service import ServiceMaker

yugongd = ServiceMaker(
    "yugongd",
    "yugongd.tap",
    "OpenAI-compatible API gateway over a pool of upstream keys",
    "yugongd",
)
