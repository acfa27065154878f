{{/*
Names. The RayService name is kept to 40 characters: KubeRay derives the RayCluster, pod and
Service names from it by appending suffixes, and those must stay within 63.
*/}}
{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: pdserve
{{- end -}}

{{/* Selects the Ray pods of this release (head and workers), not Redis. */}}
{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pdserve.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}-redis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pdserve.image" -}}
{{- $suffix := ternary "cuda" "cpu" (eq .Values.device "gpu") -}}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $suffix) .Values.image.tag -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "pdserve.secretName" -}}
{{- default (printf "%s-auth" (include "pdserve.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "pdserve.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis.%s.svc:6379/0" (include "pdserve.fullname" .) .Release.Namespace -}}
{{- else if .Values.redis.externalUrl -}}
{{- .Values.redis.externalUrl -}}
{{- else -}}
{{- fail "redis: set redis.enabled=true (a Redis in the release) or redis.externalUrl" -}}
{{- end -}}
{{- end -}}

{{/* The pools this mode runs, in a stable order. */}}
{{- define "pdserve.poolNames" -}}
{{- if eq .Values.mode "colocated" -}}colocated{{- else -}}prefill,decode{{- end -}}
{{- end -}}

{{/*
Worker-group pod bounds of one pool: {replicas, min, max}. The pool's replica count is the
starting pod count; it must lie within the autoscaling bounds (without autoscaling the bounds
are the replica count itself).
Call with (dict "root" $ "name" "prefill").
*/}}
{{- define "pdserve.poolBounds" -}}
{{- $pool := index .root.Values .name -}}
{{- $r := int $pool.replicas -}}
{{- if .root.Values.autoscaling.enabled -}}
{{- $min := int $pool.autoscaling.minReplicas -}}
{{- $max := int $pool.autoscaling.maxReplicas -}}
{{- if gt $min $max -}}
{{- fail (printf "%s.autoscaling: minReplicas (%d) is above maxReplicas (%d)" .name $min $max) -}}
{{- end -}}
{{- if or (lt $r $min) (gt $r $max) -}}
{{- fail (printf "%s.replicas=%d is outside %s.autoscaling [%d, %d]: raise maxReplicas or lower replicas" .name $r .name $min $max) -}}
{{- end -}}
{{- dict "replicas" $r "min" $min "max" $max | toJson -}}
{{- else -}}
{{- dict "replicas" $r "min" $r "max" $r | toJson -}}
{{- end -}}
{{- end -}}

{{/* One pool's section of the cluster config (keys of pdserve.cluster.config.PoolConfig). */}}
{{- define "pdserve.poolConfig" -}}
{{- $p := . -}}
{{- $out := dict "replicas" (int $p.replicas) "tp" (int $p.tp) "cpus" (int $p.cpusPerRank) "max_num_seqs" (int $p.maxNumSeqs) "max_num_batched_tokens" (int $p.maxNumBatchedTokens) "chunked_prefill" $p.chunkedPrefill "max_waiting" (int $p.maxWaiting) -}}
{{- if not (kindIs "invalid" $p.kvCacheMemory) -}}
{{- /* int64: Helm reads numbers as float64, and a large float renders as 4.2e+09 */ -}}
{{- $_ := set $out "kv_cache_memory" (int64 $p.kvCacheMemory) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
The pdserve cluster config (pdserve.cluster.config.AppConfig) as YAML: the Serve app's args
and the ConfigMap's cluster.yaml. Ports and host are the Serve proxy's (see serveConfig).
*/}}
{{- define "pdserve.appConfig" -}}
{{- $v := .Values -}}
{{- $cfg := dict "model" $v.model.name "dtype" $v.model.dtype "mode" $v.mode "block_size" (int $v.blockSize) -}}
{{- range $name := splitList "," (include "pdserve.poolNames" .) -}}
{{- $_ := set $cfg $name (include "pdserve.poolConfig" (index $v $name) | fromJson) -}}
{{- end -}}
{{- $_ := set $cfg "kv_transfer" (dict "timeout_s" $v.kvTransfer.timeoutS "compress" $v.kvTransfer.compress) -}}
{{- /* host 0.0.0.0: the proxies do listen on every pod interface; pdserve then insists on
API keys, which reach it as PDSERVE_API_KEYS from the Secret (never in this config). */ -}}
{{- $router := dict "host" "0.0.0.0" "port" (int $v.serve.httpPort) "policy" $v.router.policy "retries" (int $v.router.retries) "request_timeout_s" $v.router.requestTimeoutS -}}
{{- if $v.serve.grpcServicerFunctions -}}
{{- $_ := set $router "grpc_port" (int $v.serve.grpcPort) -}}
{{- end -}}
{{- if $v.auth.allowPublicWithoutKeys -}}
{{- $_ := set $router "allow_public_without_keys" true -}}
{{- end -}}
{{- $_ := set $cfg "router" $router -}}
{{- $_ := set $cfg "slo" (dict "ttft_s" $v.slo.ttftS "tpot_s" $v.slo.tpotS) -}}
{{- $_ := set $cfg "redis_url" (include "pdserve.redisUrl" .) -}}
{{- toYaml (mergeOverwrite $cfg (deepCopy $v.extraConfig)) -}}
{{- end -}}

{{/* The Ray Serve config (ServeDeploySchema) that the RayService deploys. */}}
{{- define "pdserve.serveConfig" -}}
{{- $v := .Values -}}
{{- /* external_scaler_enabled: pdserve's scaling controller sets the replica counts */ -}}
{{- $app := dict "name" "pdserve" "route_prefix" "/" "import_path" "pdserve.cluster.app:build_app" "external_scaler_enabled" true "args" (include "pdserve.appConfig" . | fromYaml) -}}
{{- $cfg := dict "proxy_location" $v.serve.proxyLocation "http_options" (dict "host" "0.0.0.0" "port" (int $v.serve.httpPort)) "grpc_options" (dict "port" (int $v.serve.grpcPort) "grpc_servicer_functions" (default (list) $v.serve.grpcServicerFunctions)) "applications" (list $app) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Environment of every Ray container. */}}
{{- define "pdserve.rayEnv" -}}
- name: PDSERVE_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "pdserve.secretName" . }}
      key: {{ .Values.auth.apiKeysKey }}
      optional: true
- name: PDSERVE_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "pdserve.secretName" . }}
      key: {{ .Values.auth.adminTokenKey }}
      optional: true
- name: PDSERVE_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "pdserve.rayVolumeMounts" -}}
- name: shm
  mountPath: /dev/shm
- name: config
  mountPath: /etc/pdserve
  readOnly: true
{{- if .Values.model.volume.enabled }}
- name: model
  mountPath: {{ .Values.model.volume.mountPath }}
  readOnly: {{ .Values.model.volume.readOnly }}
{{- end }}
{{- end -}}

{{- define "pdserve.rayVolumes" -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSize }}
- name: config
  configMap:
    name: {{ include "pdserve.fullname" . }}-config
{{- if .Values.model.volume.enabled }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.volume.claimName is required when model.volume.enabled" .Values.model.volume.claimName }}
    readOnly: {{ .Values.model.volume.readOnly }}
{{- end }}
{{- end -}}

{{/* Pod metadata of a Ray pod. Call with (dict "root" $ "component" "head"). */}}
{{- define "pdserve.rayPodMeta" -}}
labels:
  {{- include "pdserve.labels" .root | nindent 2 }}
  {{- include "pdserve.selectorLabels" .root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- /*
A changed auth setting or cluster config rolls out a new Ray cluster: env vars are read when a
pod starts. The auth checksum is over the values, not the rendered Secret, whose generated
token would differ between renders.
*/}}
annotations:
  checksum/auth: {{ toJson .root.Values.auth | sha256sum }}
  checksum/config: {{ include "pdserve.appConfig" .root | sha256sum }}
  {{- with .root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}
