"""The course's grading secret: the seed of every hidden case, kept with the gradebook.

Hidden cases must not be derivable by a learner, so their seeds come from a
random secret created the first time a course is graded and stored in the
gradebook's own database (a table of its own, ``bncourse_secret``, beside
nbgrader's), SQLite or PostgreSQL alike: every grader process that can reach the
gradebook finds the same secret, and regrading draws the same hidden cases.
The sandbox never sees the gradebook, so a submission never sees the secret.

For plain ``nbgrader autograde`` (trusted notebooks only: it runs them with the
instructor's rights), :class:`ProvideGradingSecret` hands the secret to the
notebook's kernel in the ``BN_GRADING_SECRET`` environment variable.
"""

from __future__ import annotations

import os
import secrets

import sqlalchemy
from nbgrader.preprocessors import NbGraderPreprocessor

from bn_reference.grading import SECRET_VARIABLE

_TABLE = sqlalchemy.Table("bncourse_secret", sqlalchemy.MetaData(),
                          sqlalchemy.Column("id", sqlalchemy.Integer, primary_key=True, autoincrement=False),
                          sqlalchemy.Column("secret", sqlalchemy.String(128), nullable=False))


def course_secret(db_url: str) -> str:
    """The grading secret of the course whose gradebook is ``db_url``, created on first use
    (concurrent first uses agree: one insert wins, everyone reads it back)."""
    engine = sqlalchemy.create_engine(db_url)
    try:
        try:
            _TABLE.create(engine, checkfirst=True)
        except sqlalchemy.exc.DBAPIError:  # another grader created the table meanwhile
            if not sqlalchemy.inspect(engine).has_table(_TABLE.name):
                raise
        with engine.begin() as connection:
            row = connection.execute(sqlalchemy.select(_TABLE.c.secret).where(_TABLE.c.id == 1)).first()
        if row is None:
            try:
                with engine.begin() as connection:
                    connection.execute(_TABLE.insert().values(id=1, secret=secrets.token_hex(32)))
            except sqlalchemy.exc.IntegrityError:  # another grader created it first
                pass
            with engine.begin() as connection:
                row = connection.execute(sqlalchemy.select(_TABLE.c.secret).where(_TABLE.c.id == 1)).first()
        return row[0]
    finally:
        engine.dispose()


class ProvideGradingSecret(NbGraderPreprocessor):
    """For plain ``nbgrader autograde``: put the course's secret in the environment the
    notebook's kernel starts with, so its hidden tests can draw their cases."""

    def preprocess(self, nb, resources):
        os.environ[SECRET_VARIABLE] = course_secret(resources["nbgrader"]["db_url"])
        return nb, resources
