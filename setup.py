from setuptools import find_packages, setup

setup(
    name="couchtoken",
    version="0.1.0",
    description="Token-guarded download links for CouchDB attachments (Klein + treq)",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.11",
    packages=[*find_packages(include=["couchtoken", "couchtoken.*"]), "twisted.plugins"],
    install_requires=[
        "twisted[tls,http2]>=24.7",
        "treq>=24.9",
        "klein>=24.8",
        "werkzeug>=3.0",
        "attrs>=23.1",
        "cachetools>=5.3",
        "prometheus-client>=0.20",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.3",
            "hypothesis>=6.100",
            "ruff>=0.6",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Database",
        "Topic :: Internet :: WWW/HTTP :: HTTP Servers",
    ],
)
