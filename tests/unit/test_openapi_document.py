"""The OpenAPI document of a tier describes each task it serves: one request variant per task
(discriminated by ``task``) with the JSON Schema of exactly what that task's decoder takes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import jsonschema

from cascade.contract.input_schemas import input_json_schema
from cascade.contract.input_spec import FeaturesInput
from cascade.contract.inputs import input_decoder
from cascade.http.app import create_app
from tests.unit.otel_fixtures import make_node, serving

WINE = FeaturesInput(kind="features", length=2, names=("alcohol", "ash"))


async def test_the_request_body_is_one_variant_per_served_task(tmp_path: Path) -> None:
    node = make_node(tmp_path)
    documents = node.tasks["documents"]
    node.tasks["documents"] = replace(
        documents, input_schema=input_json_schema("text", None, max_text_chars=50))
    node.tasks["wine"] = replace(documents, name="wine", decode=input_decoder("features", WINE),
                                 input_schema=input_json_schema("features", WINE,
                                                                max_text_chars=50))
    async with serving(create_app(node)) as client:
        document = (await client.get("/openapi.json")).json()
        again = (await client.get("/openapi.json")).json()
    assert again == document
    body = document["paths"]["/v1/infer"]["post"]["requestBody"]["content"]["application/json"]
    mapping = body["schema"]["discriminator"]["mapping"]
    assert body["schema"]["discriminator"]["propertyName"] == "task"
    assert sorted(mapping) == ["documents", "wine"]
    components = document["components"]["schemas"]
    wine = components[mapping["wine"].rsplit("/", 1)[1]]
    docs = components[mapping["documents"].rsplit("/", 1)[1]]
    assert wine["properties"]["task"]["const"] == "wine"
    valid = jsonschema.Draft202012Validator(wine).is_valid
    assert valid({"task": "wine", "input": {"features": {"alcohol": 13.2, "ash": 2.4}}})
    assert valid({"task": "wine", "input": {"features": [13.2, 2.4]}})
    assert not valid({"task": "wine", "input": {}})  # the example: schema-valid before
    assert not valid({"task": "wine", "input": {"features": [13.2]}})
    docs_valid = jsonschema.Draft202012Validator(docs).is_valid
    assert docs_valid({"task": "documents", "input": {"text": "x"}})
    assert not docs_valid({"task": "documents", "input": {"text": " \u3000\n"}})  # blank
    assert not docs_valid({"task": "documents", "input": {"text": "x" * 51}})
    assert not docs_valid({"task": "documents", "input": {"text": "x"}, "stream": 0})
