-- 统一错误格式
local error_messages = {
  backend_error = "后端服务异常",
  timeout = "请求超时",
  rate_limit = "请求过于频繁"
}

local message = error_messages[error.type] or "未知错误"

return {
  status_code = error.status_code,
  body = {
    error = {
      message = message,
      type = error.type,
      request_id = request.id
    }
  }
}
